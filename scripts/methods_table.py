"""One Markdown row per run directory: method, Local/Base/Novel/HM3/HM2 at the reported round,
trainable parameters per client, tensor values per client per round each way, wall time.

    python scripts/methods_table.py ~/pfedmma-runs/*/        # any run directories, in the order given

Everything is read from the run directories (summary.json, evaluation.json, method.json); runs
that did not finish (no summary.json) are listed as such.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def row(run_dir: Path, with_run: bool = True) -> str:
    summary, method = _load(run_dir / "summary.json"), _load(run_dir / "method.json")
    name = method.get("method") or _load(run_dir / "config.json").get("method", "?")
    if not summary:
        return f"| {name} | not finished | | | | | | | |" + (f" | {run_dir.name} |" if with_run else " |")
    ev = summary.get("evaluation", {})
    traffic = summary.get("communication", {})
    cells = [
        name,
        str(summary.get("selected-round")),
        *(_pct(ev.get(k)) for k in ("local", "base", "novel", "hm3", "hm2")),
        f"{method.get('parameters', {}).get('trainable-per-client', 0):,}",
        f"{traffic.get('floats-up-per-client-round', 0):,.0f} / {traffic.get('floats-down-per-client-round', 0):,.0f}",
        f"{summary.get('wall-seconds', 0):.0f}",
        *([run_dir.name] if with_run else []),
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--no-run-column", action="store_true", help="leave out the run directory names")
    args = parser.parse_args()
    columns = ["method", "round", "Local", "Base", "Novel", "HM3", "HM2", "trainable / client",
               "values up / down per client-round", "wall s", *([] if args.no_run_column else ["run"])]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for run_dir in args.run_dirs:
        print(row(run_dir.expanduser(), with_run=not args.no_run_column))


if __name__ == "__main__":
    main()
