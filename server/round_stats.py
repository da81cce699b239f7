"""What one round looked like on the server: replies, rejections, metrics and traffic per client."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict

from common import protocol as wire


def array_floats(content: RecordDict) -> int:
    """Number of tensor values (floats) in a message's array records."""
    return sum(int(np.prod(a.shape)) for record in content.array_records.values() for a in record.values())


def client_order(key: str) -> tuple[bool, int | str]:
    """Sort key of per-client tables: partition ids in number order, then "node-N" keys."""
    return (not key.isdigit(), int(key) if key.isdigit() else key)


def merge_device(known: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, Any]:
    """A client's newer device report, keeping the larger peak memory of the two."""
    peaks = [float(r[wire.PEAK_MEMORY]) for r in (known, report) if wire.PEAK_MEMORY in r]
    return {**report, wire.PEAK_MEMORY: max(peaks)} if peaks else dict(report)


@dataclass
class RoundStats:
    """What one round's messages looked like; the run directory writes it out."""

    sampled_train: int = 0
    num_partitions: set[int] = field(default_factory=set)  # as reported by the clients
    private_sources: dict[int, str] = field(default_factory=dict)  # partition id -> init/context/disk
    valid: int = 0
    # "<node id>" -> reason, keyed by the node the reply is about: for an error the SuperLink
    # writes itself (e.g. "Node Unavailable"), the node the instruction went to. Repeated ids
    # get a "#n" suffix rather than overwriting each other.
    rejected: dict[str, str] = field(default_factory=dict)
    bytes_received: int = 0
    floats_down: dict[int, int] = field(default_factory=dict)  # node id -> tensor values sent to it
    floats_up: dict[int, int] = field(default_factory=dict)  # node id -> tensor values it sent back
    train_metrics: dict[str, float] = field(default_factory=dict)
    full_eval: bool = False  # whether Base/Novel were asked for this round
    evaluation: dict[int, dict[str, float]] = field(default_factory=dict)  # partition id -> metric -> value
    domains: dict[int, str] = field(default_factory=dict)  # partition id -> domain (feature shift)
    devices: dict[int, dict[str, str | float | bool]] = field(default_factory=dict)  # partition id -> device report
    sampled_evaluate: int = 0
    skipped_images: dict[int, int] = field(default_factory=dict)  # partition id -> files left out (skip-corrupt)
    # Evaluations not counted in the means: partition id -> why (e.g. it has never trained).
    excluded: dict[int, str] = field(default_factory=dict)
    # Errors a client reported as permanent (it would repeat them every round): "client 3" -> reason.
    permanent: dict[str, str] = field(default_factory=dict)
    update_norms: dict[str, float] = field(default_factory=dict)  # client (or "node-N") -> ||reply - global||
    clipped: dict[str, float] = field(default_factory=dict)  # updates over the bound, clipped: -> norm before
    global_norm: float | None = None  # ||global shared state|| the updates were measured against

    @property
    def counted(self) -> dict[int, dict[str, float]]:
        """The evaluations the means are taken over."""
        return {c: row for c, row in self.evaluation.items() if c not in self.excluded}

    def reject(self, node_id: int, reason: str) -> None:
        key, n = str(node_id), 1
        while key in self.rejected:
            n += 1
            key = f"{node_id}#{n}"
        self.rejected[key] = reason

    def count_sent(self, messages: Iterable[Message]) -> None:
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.floats_down[node] = self.floats_down.get(node, 0) + array_floats(msg.content)

    def count_received(self, msg: Message) -> None:
        if msg.has_error():
            return
        node = msg.metadata.src_node_id
        self.floats_up[node] = self.floats_up.get(node, 0) + array_floats(msg.content)

    def communication(self, partition_of: Mapping[int, int]) -> dict[str, dict[str, int]]:
        """Tensor values each client received and sent this round, keyed by partition id when known."""
        out: dict[str, dict[str, int]] = {}
        for node in sorted(set(self.floats_down) | set(self.floats_up)):
            # A restarted node has a new id for the same client: its traffic adds up.
            key = str(partition_of[node]) if node in partition_of else f"node-{node}"
            cell = out.setdefault(key, {"floats-down": 0, "floats-up": 0})
            cell["floats-down"] += self.floats_down.get(node, 0)
            cell["floats-up"] += self.floats_up.get(node, 0)
        return dict(sorted(out.items(), key=lambda kv: client_order(kv[0])))

    @property
    def local_accuracy(self) -> dict[int, float]:
        return {c: row["local"] for c, row in self.counted.items() if "local" in row}
