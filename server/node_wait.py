"""Waiting for nodes with a limit: Flower's own sampling waits for ``min-available-nodes`` forever.

A paper preset asks for 10 nodes; started with fewer (a simulation with ``num-supernodes=4``, a
deployment whose clients have not joined), the run would hang without a word. Here the wait
prints how many nodes it sees now and then, and gives up after ``node-wait-timeout`` seconds,
naming ``min-available-nodes`` and the nodes it saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.serverapp import Grid

POLL_SECONDS = 1.0
REPORT_EVERY = 30.0  # seconds between "waiting for nodes" lines


class NodesMissing(RuntimeError):
    """Fewer nodes than needed connected within the wait."""


def wait_for_nodes(
    grid: Grid,
    needed: int,
    timeout: float,
    why: str = "min-available-nodes",
    say: Callable[[str], None] = lambda line: print(line, flush=True),
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """The connected node ids once there are at least ``needed``; :class:`NodesMissing` after
    ``timeout`` seconds. ``why`` names the setting that asks for ``needed`` nodes."""
    start = last_report = clock()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        now = clock()
        if now - start >= timeout:
            seen = ", ".join(map(str, nodes)) or "none"
            raise NodesMissing(
                f"{len(nodes)} of {why}={needed} nodes connected within node-wait-timeout={timeout:g} s "
                f"(node ids seen: {seen}); start {needed} SuperNodes (simulation: --federation-config "
                f"\"num-supernodes={needed}\"; pfedmma-compare takes it from the preset) or lower {why}"
            )
        if now - last_report >= REPORT_EVERY:
            say(f"[pfedmma] waiting for nodes: {len(nodes)} of {why}={needed} connected "
                f"({timeout - (now - start):.0f} s left of node-wait-timeout)")
            last_report = now
        sleep(POLL_SECONDS)
