"""A strategy that trains nothing: every round only evaluates (zero-shot CLIP)."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord

from server.strategies.shared_fedavg import SharedFedAvg


class EvaluateOnly(SharedFedAvg):
    trains = False
    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return None, None
