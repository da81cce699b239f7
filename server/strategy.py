"""pFedMMA's strategy: FedAvg over the shared projections, with every reply validated first."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from server.validation import TensorSpec, reply_bytes, reply_problem

log = logging.getLogger(__name__)

PER_CLIENT_KEYS = ("partition-id",)  # identifiers, not quantities to average


@dataclass
class RoundStats:
    """What one round's replies looked like; the run directory writes it out."""

    sampled_train: int = 0
    valid: int = 0
    rejected: dict[int, str] = field(default_factory=dict)  # node id -> reason
    bytes_received: int = 0
    train_metrics: dict[str, float] = field(default_factory=dict)
    local_accuracy: dict[int, float] = field(default_factory=dict)  # partition id -> accuracy


def _mean_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of every reported metric except identifiers."""
    weights = [float(next(iter(r.metric_records.values()))[weight_key]) for r in records]
    total = sum(weights)
    sums: dict[str, float] = {}
    for record, w in zip(records, weights, strict=True):
        for key, value in next(iter(record.metric_records.values())).items():
            if key in PER_CLIENT_KEYS or key == weight_key or not isinstance(value, (int, float)):
                continue
            sums[key] = sums.get(key, 0.0) + float(value) * w / total
    return MetricRecord({**sums, weight_key: int(total)})


class PFedMMA(FedAvg):
    """Sends and averages only shared tensors; drops invalid replies, logging node and reason.

    ``shared_specs`` is the global shared state's key set, shapes and dtypes: a reply must
    match it exactly. Local accuracy is reported as the unweighted mean over clients (SPEC §4).
    """

    def __init__(self, shared_specs: Mapping[str, TensorSpec], **kwargs) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", _mean_metrics)
        super().__init__(**kwargs)
        self.shared_specs = dict(shared_specs)
        self.rounds: dict[int, RoundStats] = {}

    def stats(self, server_round: int) -> RoundStats:
        return self.rounds.setdefault(server_round, RoundStats())

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.stats(server_round).sampled_train = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats(server_round)
        accepted = []
        for msg in replies:
            stats.bytes_received += reply_bytes(msg)
            problem = reply_problem(msg, self.shared_specs, self.weighted_by_key)
            if problem is None:
                accepted.append(msg)
            else:
                stats.rejected[msg.metadata.src_node_id] = problem
                log.warning("round %d: dropped reply of node %d: %s", server_round, msg.metadata.src_node_id, problem)
        stats.valid = len(accepted)
        if not accepted:
            log.warning("round %d: no valid reply; the global shared state is unchanged", server_round)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if metrics is not None:
            stats.train_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        stats = self.stats(server_round)
        for msg in replies:
            if msg.has_error():
                log.warning("round %d: evaluation failed on node %d: %s", server_round, msg.metadata.src_node_id, msg.error.reason)
                continue
            metrics = next(iter(msg.content.metric_records.values()), None)
            if metrics is None or "local-accuracy" not in metrics:
                log.warning("round %d: node %d sent no local-accuracy", server_round, msg.metadata.src_node_id)
                continue
            client = int(metrics.get("partition-id", msg.metadata.src_node_id))
            stats.local_accuracy[client] = float(metrics["local-accuracy"])
        if not stats.local_accuracy:
            return None
        values = list(stats.local_accuracy.values())
        return MetricRecord({"local-accuracy": sum(values) / len(values), "num-clients": len(values)})
