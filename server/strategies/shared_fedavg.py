"""FedAvg over a method's shared tensors only, with every reply validated first.

Used by every method whose server averages its shared set (pfedmma, fedavg-mma, promptfl,
fedpgp; local, whose shared set is empty) and subclassed by the others.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import protocol as wire
from common.config import RunConfig
from common.errors import PERMANENT_ERROR_CODE
from common.metrics import summarize
from common.protocol import identifier, scalar
from common.seeds import sub_seed
from server.aggregation import Combiner
from server.node_wait import wait_for_nodes
from server.round_stats import RoundStats, merge_device
from server.validation import (
    ReplyLimits,
    TensorSpec,
    clip_update,
    device_info,
    metrics_problem,
    reply_bytes,
    reply_problem,
    state_norm,
    state_problem,
    update_norm,
)

log = logging.getLogger(__name__)

# Identifiers and per-client counts, not quantities to average.
MAX_REASON = 2000  # characters of a client's error reason that are kept
MAX_DOMAIN = 100  # characters of a client's reported domain name that are kept


def _mean_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of every reported metric except identifiers (the records are
    validated replies: finite numbers, counts within the cap)."""
    weights = [scalar(r.metric_records[wire.METRICS], weight_key) or 0.0 for r in records]
    total = sum(weights)
    sums: dict[str, float] = {}
    for record, w in zip(records, weights, strict=True):
        for key, value in record.metric_records[wire.METRICS].items():
            if key in wire.PER_CLIENT_KEYS or key == weight_key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            sums[key] = sums.get(key, 0.0) + float(value) * w / total
    return MetricRecord({**sums, weight_key: int(total)})


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in arrays.items()}


class SharedFedAvg(FedAvg):
    """Sends and averages only shared tensors; drops invalid replies, logging node and reason.

    ``shared_specs`` is the global shared state's key set, shapes and dtypes: a reply must
    match it exactly, so a reply carrying any tensor outside the method's shared set is
    rejected. Local accuracy is reported as the unweighted mean over clients (docs/paper.md §4).
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
        limits: ReplyLimits | None = None,
        combiner: Combiner | None = None,
        examples_cap: Callable[[int], tuple[int, str]] | None = None,
        node_wait_timeout: float = 300.0,
        **kwargs,
    ) -> None:
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
        self.limits = limits or ReplyLimits()
        self.combiner = combiner or Combiner(RunConfig.model_validate({}))
        # num-examples cap from the number of connected nodes (max-examples = 0): set at round 1.
        self.examples_cap = examples_cap
        self.node_wait_timeout = node_wait_timeout  # then NodesMissing, not Flower's endless wait
        self.global_arrays: dict[str, np.ndarray] = {}  # what this round's clients were sent
        self.outbox: list[Message] = []  # this round's instructions: Flower gives them ids as it sends them

    @classmethod
    def from_config(cls, cfg: RunConfig, *args, **kwargs) -> SharedFedAvg:
        """Build from the run config; subclasses read their own keys here."""
        return cls(*args, **{**cls.config_kwargs(cfg), **kwargs})

    @staticmethod
    def config_kwargs(cfg: RunConfig) -> dict[str, object]:
        limits = ReplyLimits(
            max_examples=cfg.max_examples or ReplyLimits.max_examples, max_abs=cfg.max_parameter_abs,
            update_norm_bound=cfg.update_norm_bound, update_norm_action=cfg.update_norm_action,
        )
        return {"seed": cfg.seed, "limits": limits, "combiner": Combiner(cfg), "node_wait_timeout": cfg.node_wait_timeout}

    def sender(self, msg: Message) -> int:
        """The node a reply is about. An error the SuperLink writes itself (a node it declared
        dead) comes from the SuperLink's id; the instruction it answers names the lost node."""
        for sent in self.outbox:
            if sent.metadata.message_id and sent.metadata.message_id == msg.metadata.reply_to_message_id:
                return sent.metadata.dst_node_id
        return msg.metadata.src_node_id

    def who(self, node: int) -> str:
        return f"node {node} (client {self.partition_of[node]})" if node in self.partition_of else f"node {node}"

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
        client, partitions = identifier(metrics, wire.PARTITION_ID), identifier(metrics, wire.NUM_PARTITIONS)
        if client is not None:
            self.partition_of[msg.metadata.src_node_id] = client
        if partitions is not None:
            stats.num_partitions.add(partitions)
        key = client if client is not None else msg.metadata.src_node_id
        skipped = identifier(metrics, wire.SKIPPED_IMAGES)
        if skipped:
            stats.skipped_images[key] = skipped
        device = device_info(msg.content.config_records.get(wire.DEVICE))
        if device:  # a training and an evaluation reply of one round: the larger peak is kept
            stats.devices[key] = merge_device(stats.devices.get(key, {}), device)
        return client

    def record_accepted(self, server_round: int, accepted: list[Message]) -> None:
        """Bookkeeping of the valid training replies of a round, before they are averaged."""
        stats = self.stats(server_round)
        for msg in accepted:
            reported = msg.content.metric_records[wire.METRICS]  # present: the reply was screened
            client, source = self.note_client(msg, reported, stats), identifier(reported, wire.PRIVATE_SOURCE)
            if source is not None and source < len(wire.PRIVATE_SOURCES):
                stats.private_sources[client if client is not None else -1] = wire.PRIVATE_SOURCES[source]
            # Keyed as evaluations are: by partition id, by node id when none was reported.
            self.trained.add(client if client is not None else msg.metadata.src_node_id)

    def note_error(self, server_round: int, msg: Message) -> None:
        """Keep an error reply's reason when the client marked it permanent."""
        if msg.error.code != PERMANENT_ERROR_CODE:
            return
        # A client's text: bounded before it reaches logs and summary.json.
        node, reason = self.sender(msg), (msg.error.reason or "")[:MAX_REASON]
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
        """Strategy-specific entries of the round's metrics.jsonl row: update norms (and which
        were clipped), the aggregation rule, and the DP figures (epsilon spent so far)."""
        stats = self.stats(server_round)
        record: dict[str, object] = {
            "aggregation": self.combiner.cfg.aggregation,
            "global-norm": stats.global_norm,
            "update-norms": {who: n for who, n in sorted(stats.update_norms.items())},
            "clipped-updates": {who: n for who, n in sorted(stats.clipped.items())},
        }
        if self.combiner.privacy is not None:
            record["privacy"] = self.combiner.privacy.record()
        return record

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
        connected = wait_for_nodes(grid, max(self.min_available_nodes, size), self.node_wait_timeout)
        if self.examples_cap is not None:  # the partition is known once the clients are
            cap, why = self.examples_cap(len(connected))
            self.limits = dataclasses.replace(self.limits, max_examples=cap)
            self.examples_cap = None
            log.info("num-examples cap: %d (%s)", cap, why)
        rng = random.Random(sub_seed(self.seed, server_round, int(training)))
        chosen = sorted(rng.sample(sorted(connected), size))
        log.info("round %d: %s %d of %d nodes", server_round, "training" if training else "evaluating", size, len(connected))
        return chosen

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, training: bool, nodes: list[int] | None = None) -> list[Message]:
        nodes = self.sample(grid, server_round, training) if nodes is None else nodes
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: ConfigRecord({**dict(config), wire.SERVER_ROUND: server_round})})
        kind = MessageType.TRAIN if training else MessageType.EVALUATE
        return [self.personalise(Message(content=content, message_type=kind, dst_node_id=node), server_round, training) for node in nodes]

    def in_client_order(self, replies: list[Message]) -> list[Message]:
        """Replies sorted by partition id (node id when unknown): a float sum depends on its
        order, and replies arrive in whatever order clients finish."""
        def key(msg: Message) -> tuple[int, int]:
            metrics = msg.content.metric_records.get(wire.METRICS)
            client = identifier(metrics, wire.PARTITION_ID) if metrics is not None else None
            return (client if client is not None else -1, msg.metadata.src_node_id)

        return sorted(replies, key=key)

    # -- Flower's hooks ---------------------------------------------------------------------

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        server_round = self.real_round(server_round)
        config = ConfigRecord({**dict(config), **self.client_config})
        self.global_arrays = _numpy(arrays)
        self.stats(server_round).global_norm = state_norm(self.global_arrays)  # what each update is measured against
        privacy = self.combiner.privacy
        if privacy is None:
            messages = self._messages(server_round, arrays, config, grid, training=True)
        else:  # Flower's DP wrapper may add its clipping norm to the config, and accounts the round
            nodes = self.sample(grid, server_round, training=True)
            messages = privacy.configure(
                server_round, arrays, config, grid, nodes,
                lambda cfg: self._messages(server_round, arrays, cfg, grid, training=True, nodes=nodes),
            )
        stats = self.stats(server_round)
        stats.sampled_train = len(messages)
        stats.count_sent(messages)
        self.outbox = list(messages)
        return messages

    def screen(self, server_round: int, msg: Message) -> tuple[dict[str, np.ndarray] | None, str | None, bool | None]:
        """A training reply's shared tensors as they may be combined (clipped if over the norm
        bound under update-norm-action=clip, and to the DP clip under dp=server-*), or None and
        why not; and, under DP, whether it was within the DP clip (for adaptive clipping)."""
        problem = reply_problem(msg, self.shared_specs, self.weighted_by_key, self.limits)
        if problem is not None:
            return None, problem, None
        arrays = _numpy(msg.content.array_records[wire.SHARED])  # present: reply_problem checked the names
        if not self.global_arrays:  # no reference (unit use): nothing to bound against
            return arrays, None, None
        stats, node = self.stats(server_round), self.sender(msg)
        norm, reference = update_norm(arrays, self.global_arrays), stats.global_norm or 0.0
        # Keyed as the communication figures are: by the partition id the (validated) reply
        # reports, the node id otherwise; node ids differ from one deployment to the next.
        client = identifier(msg.content.metric_records[wire.METRICS], wire.PARTITION_ID)
        label = str(client) if client is not None else f"node-{node}"
        stats.update_norms[label] = norm
        bound = self.limits.update_norm_bound * reference
        if self.limits.update_norm_bound and norm > bound:
            ratio = f"update norm {norm:.4g} is {norm / max(reference, 1e-30):.3g}x the global state's norm {reference:.4g}"
            if self.limits.update_norm_action == "reject":
                return None, f"{ratio}, above update-norm-bound={self.limits.update_norm_bound:g}", None
            stats.clipped[label] = norm
            log.warning("round %d: %s: %s; clipped to %.4g (update-norm-action=clip)", server_round, self.who(node), ratio, bound)
            arrays, norm = clip_update(arrays, self.global_arrays, bound), bound
            # Whatever else reads the reply (pFedMoAP's prompt bank) sees the clipped tensors too.
            msg.content[wire.SHARED] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        privacy = self.combiner.privacy
        if privacy is None:
            return arrays, None, None
        clip = privacy.clipping_norm
        # Under adaptive clipping the wrapper moves the clip from these indicators. They say
        # "left unclipped", as in Andrew et al.'s rule: Flower's own counts clipped updates into
        # the same formula, which shrinks the clip when most updates are clipped.
        if privacy.client_side:
            # The client was asked to clip; a reply that did not is refused, not trusted, and
            # whether it had to clip is read from its norm, not from what it says.
            if norm > clip * (1 + 1e-4) + 1e-6:
                return None, f"update norm {norm:.4g} is above the DP clipping norm {clip:.4g} the client was asked to apply", None
            return arrays, None, norm < clip * (1 - 1e-4)
        return clip_update(arrays, self.global_arrays, clip), None, norm <= clip

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round = self.real_round(server_round)
        stats = self.stats(server_round)
        screened: dict[int, tuple[dict[str, np.ndarray], bool | None]] = {}  # id(msg) -> what it contributes
        accepted = []
        for msg in replies:
            stats.bytes_received += reply_bytes(msg)
            stats.count_received(msg)
            arrays, problem, dp_clipped = self.screen(server_round, msg)
            if arrays is not None:
                screened[id(msg)] = (arrays, dp_clipped)
                accepted.append(msg)
                continue
            if msg.has_error():
                self.note_error(server_round, msg)
            node = self.sender(msg)
            stats.reject(node, problem or "")
            log.warning("round %d: dropped reply of %s: %s", server_round, self.who(node), problem)
        stats.valid = len(accepted)
        accepted = self.in_client_order(accepted)
        self.record_accepted(server_round, accepted)
        if not accepted:
            log.warning("round %d: no valid reply; the global shared state is unchanged", server_round)
            return None, None
        metrics = _mean_metrics([m.content for m in accepted], self.weighted_by_key)
        stats.train_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        weights = [int(m.content.metric_records[wire.METRICS][self.weighted_by_key]) for m in accepted]  # type: ignore[arg-type]
        ballots = self.combiner.ballots((m, screened[id(m)][0], w, screened[id(m)][1]) for m, w in zip(accepted, weights, strict=True))
        combined = self.combiner.combine(server_round, ballots)
        if combined is None:
            return None, metrics
        problem = state_problem(combined, self.shared_specs, self.limits.max_abs)
        if problem is not None:  # cannot come from validated replies; kept as the last line of defence
            log.error("round %d: the combined state is unusable (%s); the global shared state is unchanged", server_round, problem)
            return None, metrics
        return combined, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        server_round = self.real_round(server_round)
        full = self.is_full_eval_round(server_round)
        stats = self.stats(server_round)
        stats.full_eval = full
        config = ConfigRecord({**dict(config), **self.client_config, wire.FULL_EVAL: full})
        messages = self._messages(server_round, arrays, config, grid, training=False)
        stats.sampled_evaluate = len(messages)
        stats.count_sent(messages)
        self.outbox = list(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-client accuracies are kept; the aggregate is their unweighted mean (docs/paper.md §4)."""
        server_round = self.real_round(server_round)
        stats = self.stats(server_round)
        for msg in replies:
            if msg.has_error():
                log.warning("round %d: evaluation failed on %s: %s", server_round, self.who(self.sender(msg)), (msg.error.reason or "")[:MAX_REASON])
                self.note_error(server_round, msg)
                continue
            stats.count_received(msg)
            metrics = msg.content.metric_records.get(wire.METRICS)
            if metrics is None or wire.accuracy_key("local") not in metrics:
                log.warning("round %d: node %d sent no local-accuracy", server_round, msg.metadata.src_node_id)
                continue
            problem = metrics_problem(metrics)
            if problem is not None:
                stats.reject(msg.metadata.src_node_id, f"evaluation: {problem}")
                log.warning("round %d: dropped evaluation of %s: %s", server_round, self.who(msg.metadata.src_node_id), problem)
                continue
            partition_id = self.note_client(msg, metrics, stats)
            client = partition_id if partition_id is not None else msg.metadata.src_node_id
            stats.evaluation[client] = {
                key.removesuffix(wire.ACCURACY_SUFFIX): float(value)
                for key, value in metrics.items()
                if key.endswith(wire.ACCURACY_SUFFIX) and isinstance(value, (int, float))
            }
            info = msg.content.config_records.get(wire.CLIENT)
            if info is not None and wire.DOMAIN in info:
                stats.domains[client] = str(info[wire.DOMAIN])[:MAX_DOMAIN]  # a client's text, bounded like its errors
            if self.trains and client not in self.trained:
                stats.excluded[client] = "never trained in this run"
        if not stats.counted:
            return None
        means = summarize(stats.counted)
        return MetricRecord({**{k if k.startswith("hm") else wire.accuracy_key(k): v for k, v in means.items()}, "num-clients": len(stats.counted)})
