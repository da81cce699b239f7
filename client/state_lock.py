"""One run at a time per private-state namespace and client.

Two runs started with the same ``experiment-name`` and state directory would load each other's
freshly trained adapters and overwrite each other's files. Every message of a run that keeps
private state therefore goes through :func:`exclusive`: under an OS file lock (which also
serialises the two runs' messages on this node) it reads ``client-<N>.lock``, which names the
run that last used the namespace, and refuses a different run while that run's lease is fresh.

A run's lease is ``2 x round-timeout`` since its last message on this node; the run's final
evaluation releases it. A resumed run may take over from the runs it continues (the server
sends their ids as ``state-owners``). A lease left by a run that crashed expires, or is
released with ``python -m client.reset_state --unlock``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import PermanentError


class StateInUseError(PermanentError, RuntimeError):
    """Another run is using this client's private-state namespace."""


@contextmanager
def exclusive(
    path: Path, run_id: int, owners: frozenset[int], lease_seconds: float, release: bool
) -> Iterator[None]:
    """Hold ``path`` for run ``run_id`` for the duration of one message; ``release`` on the
    run's last message. ``owners``: earlier runs this one continues (a resume)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, even on a crash
        handle.seek(0)
        try:
            holder = json.loads(handle.read() or "{}")
        except json.JSONDecodeError:
            holder = {}  # a torn write of an old lock: nobody can be proven to hold it
        _check(path, holder, run_id, owners)
        yield
        handle.seek(0)
        handle.truncate()
        json.dump(
            {
                "run-id": run_id,
                "updated": time.time(),
                "expires": time.time() + lease_seconds,
                "released": release,
                "host": socket.gethostname(),
                "pid": os.getpid(),
            },
            handle,
        )
        handle.flush()


def _check(path: Path, holder: dict, run_id: int, owners: frozenset[int]) -> None:
    other = holder.get("run-id")
    if other is None or other == run_id or other in owners or holder.get("released"):
        return
    left = float(holder.get("expires", 0)) - time.time()
    if left <= 0:
        return
    namespace, client = path.parent, path.stem.removeprefix("client-")
    raise StateInUseError(
        f"private state {namespace.name!r} of client {client} is in use by run {other} (last message "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(holder.get('updated', 0))))} on "
        f"{holder.get('host', '?')}; its lease ends in {left:.0f} s). Two runs cannot share an "
        "experiment-name and state-dir: use another experiment-name, continue that run with "
        "resume-from, or, if run "
        f"{other} is no longer running, release it: python -m client.reset_state --state-dir "
        f"{namespace.parent} --experiment {namespace.name} --client {client} --unlock"
    )
