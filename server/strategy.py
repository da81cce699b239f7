"""pFedMMA's strategy: FedAvg over the shared projections, with every reply validated first."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from common.metrics import summarize
from server.validation import TensorSpec, reply_bytes, reply_problem

log = logging.getLogger(__name__)

PRIVATE_SOURCES = ("init", "context", "disk")  # the client's encoding of "private-source"
PER_CLIENT_KEYS = ("partition-id", "num-partitions", "private-source")  # identifiers, not quantities to average


@dataclass
class RoundStats:
    """What one round's replies looked like; the run directory writes it out."""

    sampled_train: int = 0
    num_partitions: set[int] = field(default_factory=set)  # as reported by the clients
    private_sources: dict[int, str] = field(default_factory=dict)  # partition id -> init/context/disk
    valid: int = 0
    # "<node id>" -> reason. Errors the SuperLink writes itself (e.g. "Node Unavailable") come
    # from the SuperLink's id, not the failed node's, so repeated ids get a "#n" suffix rather
    # than overwriting each other.
    rejected: dict[str, str] = field(default_factory=dict)

    def reject(self, node_id: int, reason: str) -> None:
        key, n = str(node_id), 1
        while key in self.rejected:
            n += 1
            key = f"{node_id}#{n}"
        self.rejected[key] = reason
    bytes_received: int = 0
    train_metrics: dict[str, float] = field(default_factory=dict)
    full_eval: bool = False  # whether Base/Novel were asked for this round
    evaluation: dict[int, dict[str, float]] = field(default_factory=dict)  # partition id -> metric -> value
    domains: dict[int, str] = field(default_factory=dict)  # partition id -> domain (feature shift)

    @property
    def local_accuracy(self) -> dict[int, float]:
        return {c: row["local"] for c, row in self.evaluation.items() if "local" in row}


def _scalar(metrics: MetricRecord, key: str) -> float | None:
    """A reported number, or None when absent or not a scalar (lists are allowed in records)."""
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mean_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of every reported metric except identifiers."""
    weights = [_scalar(next(iter(r.metric_records.values())), weight_key) or 0.0 for r in records]
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

    def __init__(
        self,
        shared_specs: Mapping[str, TensorSpec],
        num_rounds: int,
        eval_every: int = 1,
        round_offset: int = 0,
        client_config: Mapping[str, str | int | float | bool] | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", _mean_metrics)
        super().__init__(**kwargs)
        self.shared_specs = dict(shared_specs)
        self.num_rounds = num_rounds
        self.eval_every = eval_every
        # A resumed run's loop counts from 1 again; every hook maps that to the real round.
        self.round_offset = round_offset
        self.client_config = dict(client_config or {})  # sent with every train/evaluate message
        self.rounds: dict[int, RoundStats] = {}

    def real_round(self, loop_round: int) -> int:
        return loop_round + self.round_offset

    def is_full_eval_round(self, server_round: int) -> bool:
        """The full protocol (Base/Novel) runs every ``eval_every`` rounds and at the end."""
        every = self.eval_every > 0 and server_round % self.eval_every == 0
        return every or server_round == self.num_rounds

    def stats(self, server_round: int) -> RoundStats:
        return self.rounds.setdefault(server_round, RoundStats())

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        server_round = self.real_round(server_round)
        config = ConfigRecord({**dict(config), **self.client_config})
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.stats(server_round).sampled_train = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round = self.real_round(server_round)
        stats = self.stats(server_round)
        accepted = []
        for msg in replies:
            stats.bytes_received += reply_bytes(msg)
            problem = reply_problem(msg, self.shared_specs, self.weighted_by_key)
            if problem is None:
                accepted.append(msg)
            else:
                stats.reject(msg.metadata.src_node_id, problem)
                log.warning("round %d: dropped reply of node %d: %s", server_round, msg.metadata.src_node_id, problem)
        stats.valid = len(accepted)
        for msg in accepted:
            reported = msg.content.metric_records["metrics"]
            partitions, source = _scalar(reported, "num-partitions"), _scalar(reported, "private-source")
            if partitions is not None:
                stats.num_partitions.add(int(partitions))
            if source is not None and 0 <= source < len(PRIVATE_SOURCES):
                client = _scalar(reported, "partition-id")
                stats.private_sources[int(client if client is not None else -1)] = PRIVATE_SOURCES[int(source)]
        if not accepted:
            log.warning("round %d: no valid reply; the global shared state is unchanged", server_round)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if metrics is not None:
            stats.train_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        server_round = self.real_round(server_round)
        full = self.is_full_eval_round(server_round)
        self.stats(server_round).full_eval = full
        config = ConfigRecord({**dict(config), **self.client_config, "full-eval": full})
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-client accuracies are kept; the aggregate is their unweighted mean (SPEC §4)."""
        server_round = self.real_round(server_round)
        stats = self.stats(server_round)
        for msg in replies:
            if msg.has_error():
                log.warning("round %d: evaluation failed on node %d: %s", server_round, msg.metadata.src_node_id, msg.error.reason)
                continue
            metrics = msg.content.metric_records.get("metrics")
            if metrics is None or "local-accuracy" not in metrics:
                log.warning("round %d: node %d sent no local-accuracy", server_round, msg.metadata.src_node_id)
                continue
            partition_id = _scalar(metrics, "partition-id")
            client = int(partition_id) if partition_id is not None else msg.metadata.src_node_id
            stats.evaluation[client] = {
                key.removesuffix("-accuracy"): float(value)
                for key, value in metrics.items()
                if key.endswith("-accuracy") and isinstance(value, (int, float))
            }
            info = msg.content.config_records.get("client")
            if info is not None and "domain" in info:
                stats.domains[client] = str(info["domain"])
        if not stats.evaluation:
            return None
        means = summarize(stats.evaluation)
        return MetricRecord({**{k if k.startswith("hm") else f"{k}-accuracy": v for k, v in means.items()}, "num-clients": len(stats.evaluation)})
