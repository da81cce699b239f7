"""Remove stored private state, so that a client (or every client) of an experiment starts over
from the common initialisation:

    python -m client.reset_state --state-dir ~/.cache/pfedmma/state --experiment NAME [--client N] [--unlock]

NAME is the private-state namespace: the run's `experiment-name`, or `run-<id>` when it had
none (run.json in the run directory says which). Only that namespace's
``client-<N>.safetensors`` files are removed; each removed path is printed. With --unlock,
only the namespace's ``client-<N>.lock`` files are removed (the hold of a run that crashed,
see client/state_lock.py) and the private state is kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def state_files(state_dir: Path, experiment: str, client: int | None, suffix: str = "safetensors") -> list[Path]:
    """The files to remove; raises ValueError naming what is wrong."""
    root = state_dir.expanduser().resolve()
    namespace = (root / experiment).resolve()
    if namespace.parent != root:  # "..", "/" or nested names would leave the state dir
        raise ValueError(f"--experiment {experiment!r} is not a namespace directly under {root}")
    if not namespace.is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ValueError(f"no private state for experiment {experiment!r} under {root}; namespaces there: {known or 'none'}")
    pattern = f"client-{client}.{suffix}" if client is not None else f"client-*.{suffix}"
    files = sorted(namespace.glob(pattern))
    if not files:
        raise ValueError(f"no file {pattern} in {namespace}")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.reset_state", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=Path("~/.cache/pfedmma/state"))
    parser.add_argument("--experiment", required=True, help="the private-state namespace (experiment-name or run-<id>)")
    parser.add_argument("--client", type=int, help="one client's partition id; default: every client")
    parser.add_argument("--unlock", action="store_true", help="remove the run locks only, keep the private state")
    args = parser.parse_args(argv)
    try:
        files = state_files(args.state_dir, args.experiment, args.client, "lock" if args.unlock else "safetensors")
    except ValueError as err:
        print(f"reset_state: {err}", file=sys.stderr)
        return 2
    for path in files:
        path.unlink()
        print(f"removed {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
