"""FedAvg over a method's shared tensors only, with every reply validated first.

Used by every method whose server averages its shared set (pfedmma, fedavg-mma, promptfl,
fedpgp; local, whose shared set is empty) and subclassed by the others.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from common.config import RunConfig
from common.errors import PERMANENT_ERROR_CODE
from common.metrics import summarize
from common.seeds import sub_seed
from server.round_stats import PRIVATE_SOURCES, RoundStats, identifier, scalar
from server.validation import TensorSpec, reply_bytes, reply_problem

log = logging.getLogger(__name__)

# Identifiers and per-client counts, not quantities to average.
MAX_REASON = 2000  # characters of a client's error reason that are kept
PER_CLIENT_KEYS = ("partition-id", "num-partitions", "private-source", "skipped-images")


def _mean_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of every reported metric except identifiers."""
    weights = [scalar(next(iter(r.metric_records.values())), weight_key) or 0.0 for r in records]
    total = sum(weights)
    sums: dict[str, float] = {}
    for record, w in zip(records, weights, strict=True):
        for key, value in next(iter(record.metric_records.values())).items():
            if key in PER_CLIENT_KEYS or key == weight_key or not isinstance(value, (int, float)):
                continue
            sums[key] = sums.get(key, 0.0) + float(value) * w / total
    return MetricRecord({**sums, weight_key: int(total)})


class SharedFedAvg(FedAvg):
    """Sends and averages only shared tensors; drops invalid replies, logging node and reason.

    ``shared_specs`` is the global shared state's key set, shapes and dtypes: a reply must
    match it exactly, so a reply carrying any tensor outside the method's shared set is
    rejected. Local accuracy is reported as the unweighted mean over clients (SPEC §4).
    Subclasses change what each client is sent through :meth:`personalise`.

    A client's evaluation counts in the means only once that client has trained in this run
    (a method that trains nothing has every evaluation counted): before that it measures the
    common initialisation, not the method. Error replies a client marks as permanent are
    kept per round in :attr:`RoundStats.permanent`; :meth:`round_failure` says whether the
    run must stop.
    """

    trains = True  # whether clients train (and so whether an untrained client's evaluation is valid)

    def __init__(
        self,
        shared_specs: Mapping[str, TensorSpec],
        num_rounds: int,
        eval_every: int = 1,
        round_offset: int = 0,
        client_config: Mapping[str, str | int | float | bool] | None = None,
        seed: int = 0,
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
        self.seed = seed  # node sampling draws from (seed, round), never Python's global RNG
        self.rounds: dict[int, RoundStats] = {}
        self.partition_of: dict[int, int] = {}  # node id -> the partition id it reported
        self.trained: set[int] = set()  # partition ids with an accepted training reply in this run

    @classmethod
    def from_config(cls, cfg: RunConfig, *args, **kwargs) -> SharedFedAvg:
        """Build from the run config; subclasses read their own keys here."""
        return cls(*args, **{"seed": cfg.seed, **kwargs})

    def real_round(self, loop_round: int) -> int:
        return loop_round + self.round_offset

    def is_full_eval_round(self, server_round: int) -> bool:
        """The full protocol (Base/Novel) runs every ``eval_every`` rounds and at the end."""
        every = self.eval_every > 0 and server_round % self.eval_every == 0
        return every or server_round == self.num_rounds

    def stats(self, server_round: int) -> RoundStats:
        return self.rounds.setdefault(server_round, RoundStats())

    def communication(self, server_round: int) -> dict[str, dict[str, int]]:
        return self.stats(server_round).communication(self.partition_of)

    # -- hooks for subclasses ---------------------------------------------------------------

    def personalise(self, msg: Message, server_round: int, training: bool) -> Message:
        """The message actually sent to ``msg``'s node; FedAvg sends everyone the same."""
        return msg

    def note_client(self, msg: Message, metrics: MetricRecord, stats: RoundStats) -> int | None:
        """Record which partition a reply's node is and how many partitions it counts; its partition id."""
        client, partitions = identifier(metrics, "partition-id"), identifier(metrics, "num-partitions")
        if client is not None:
            self.partition_of[msg.metadata.src_node_id] = client
        if partitions is not None:
            stats.num_partitions.add(partitions)
        skipped = identifier(metrics, "skipped-images")
        if skipped:
            stats.skipped_images[client if client is not None else msg.metadata.src_node_id] = skipped
        return client

    def record_accepted(self, server_round: int, accepted: list[Message]) -> None:
        """Bookkeeping of the valid training replies of a round, before they are averaged."""
        stats = self.stats(server_round)
        for msg in accepted:
            reported = msg.content.metric_records["metrics"]
            client, source = self.note_client(msg, reported, stats), identifier(reported, "private-source")
            if source is not None and source < len(PRIVATE_SOURCES):
                stats.private_sources[client if client is not None else -1] = PRIVATE_SOURCES[source]
            # Keyed as evaluations are: by partition id, by node id when none was reported.
            self.trained.add(client if client is not None else msg.metadata.src_node_id)

    def note_error(self, server_round: int, msg: Message) -> None:
        """Keep an error reply's reason when the client marked it permanent."""
        if msg.error.code != PERMANENT_ERROR_CODE:
            return
        # A client's text: bounded before it reaches logs and summary.json.
        node, reason = msg.metadata.src_node_id, (msg.error.reason or "")[:MAX_REASON]
        named = re.match(r"client (\d+): (.*)", reason, re.DOTALL)  # the client names itself when it can
        if named:
            who, reason = f"client {named[1]}", named[2]
        else:
            who = f"client {self.partition_of[node]}" if node in self.partition_of else f"node {node}"
        self.stats(server_round).permanent[who] = reason

    def round_failure(self, server_round: int) -> str | None:
        """Why the run must stop after ``server_round``, or None. Transient failures (a node
        that drops out while others reply) keep the run going."""
        stats = self.stats(server_round)
        if stats.permanent:
            return f"{len(stats.permanent)} client(s) failed with an error that would repeat every round"
        if stats.sampled_train and not stats.valid:
            return f"no valid training reply from the {stats.sampled_train} sampled client(s)"
        if stats.sampled_evaluate and not stats.evaluation:
            return f"no valid evaluation reply from the {stats.sampled_evaluate} sampled client(s)"
        return None

    def round_record(self, server_round: int) -> dict[str, object]:
        """Strategy-specific entries of the round's metrics.jsonl row."""
        return {}

    def server_state(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """What the strategy keeps beyond the global arrays (tensors, string metadata), for resume."""
        return {}, {}

    def load_server_state(self, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
        """Restore :meth:`server_state` of a run being resumed."""

    def sample(self, grid: Grid, server_round: int, training: bool) -> list[int]:
        """The round's nodes, as FedAvg counts them, drawn from a generator seeded by (seed,
        round, phase) over the sorted node ids: FedAvg draws from Python's global RNG. The
        same node ids give the same sample; with fraction 1 (the default) it is every node."""
        fraction = self.fraction_train if training else self.fraction_evaluate
        if fraction == 0.0:
            return []
        minimum = self.min_train_nodes if training else self.min_evaluate_nodes
        size = max(int(len(list(grid.get_node_ids())) * fraction), minimum)
        _, connected = sample_nodes(grid, self.min_available_nodes, size)  # waits for enough nodes
        rng = random.Random(sub_seed(self.seed, server_round, int(training)))
        chosen = sorted(rng.sample(sorted(connected), size))
        log.info("round %d: %s %d of %d nodes", server_round, "training" if training else "evaluating", size, len(connected))
        return chosen

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, training: bool) -> list[Message]:
        nodes = self.sample(grid, server_round, training)
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: ConfigRecord({**dict(config), "server-round": server_round})})
        kind = MessageType.TRAIN if training else MessageType.EVALUATE
        return [self.personalise(Message(content=content, message_type=kind, dst_node_id=node), server_round, training) for node in nodes]

    def in_client_order(self, replies: list[Message]) -> list[Message]:
        """Replies sorted by partition id (node id when unknown): a float sum depends on its
        order, and replies arrive in whatever order clients finish."""
        def key(msg: Message) -> tuple[int, int]:
            metrics = msg.content.metric_records.get("metrics")
            client = identifier(metrics, "partition-id") if metrics is not None else None
            return (client if client is not None else -1, msg.metadata.src_node_id)

        return sorted(replies, key=key)

    # -- Flower's hooks ---------------------------------------------------------------------

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        server_round = self.real_round(server_round)
        config = ConfigRecord({**dict(config), **self.client_config})
        messages = self._messages(server_round, arrays, config, grid, training=True)
        stats = self.stats(server_round)
        stats.sampled_train = len(messages)
        stats.count_sent(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round = self.real_round(server_round)
        stats = self.stats(server_round)
        accepted = []
        for msg in replies:
            stats.bytes_received += reply_bytes(msg)
            stats.count_received(msg)
            problem = reply_problem(msg, self.shared_specs, self.weighted_by_key)
            if problem is None:
                accepted.append(msg)
            else:
                if msg.has_error():
                    self.note_error(server_round, msg)
                stats.reject(msg.metadata.src_node_id, problem)
                log.warning("round %d: dropped reply of node %d: %s", server_round, msg.metadata.src_node_id, problem)
        stats.valid = len(accepted)
        accepted = self.in_client_order(accepted)
        self.record_accepted(server_round, accepted)
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
        stats = self.stats(server_round)
        stats.full_eval = full
        config = ConfigRecord({**dict(config), **self.client_config, "full-eval": full})
        messages = self._messages(server_round, arrays, config, grid, training=False)
        stats.sampled_evaluate = len(messages)
        stats.count_sent(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-client accuracies are kept; the aggregate is their unweighted mean (SPEC §4)."""
        server_round = self.real_round(server_round)
        stats = self.stats(server_round)
        for msg in replies:
            if msg.has_error():
                log.warning("round %d: evaluation failed on node %d: %s", server_round, msg.metadata.src_node_id, msg.error.reason)
                self.note_error(server_round, msg)
                continue
            stats.count_received(msg)
            metrics = msg.content.metric_records.get("metrics")
            if metrics is None or "local-accuracy" not in metrics:
                log.warning("round %d: node %d sent no local-accuracy", server_round, msg.metadata.src_node_id)
                continue
            partition_id = self.note_client(msg, metrics, stats)
            client = partition_id if partition_id is not None else msg.metadata.src_node_id
            stats.evaluation[client] = {
                key.removesuffix("-accuracy"): float(value)
                for key, value in metrics.items()
                if key.endswith("-accuracy") and isinstance(value, (int, float))
            }
            info = msg.content.config_records.get("client")
            if info is not None and "domain" in info:
                stats.domains[client] = str(info["domain"])
            if self.trains and client not in self.trained:
                stats.excluded[client] = "never trained in this run"
        if not stats.counted:
            return None
        means = summarize(stats.counted)
        return MetricRecord({**{k if k.startswith("hm") else f"{k}-accuracy": v for k, v in means.items()}, "num-clients": len(stats.counted)})
