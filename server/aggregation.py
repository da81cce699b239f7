"""How the validated replies of a round become the new global shared state.

The arithmetic is Flower's: its FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan
strategies, and its differential-privacy wrappers (fixed or adaptive clipping, with Flower's RDP
accountant for fixed clipping). Flower's client-side wrappers are used for every dp mode: they
add the noise, account it and adapt the clip. Clipping itself is done by the clients (``client-*``,
verified here) or by our strategy (``server-*``) before the ballots reach the wrapper, because
Flower's server-side clipping divides by the update's norm and so fails on a reply equal to the
global state (ZeroDivisionError), which one client could send on purpose. Our strategy keeps sampling,
validation and bookkeeping; it hands these objects only *ballots*: one message per accepted
reply holding that client's shared tensors and its weight, so the Flower code sees nothing but
shared tensors and never a reply that failed validation.

A ballot's weight is the client's example count for FedAvg, and 1 under DP: the noise is
calibrated for the plain mean of clipped updates (Flower's accountant insists on equal weights).
"""

from __future__ import annotations

import copy
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)
from flwr.serverapp.strategy.dp_adaptive_clipping import DifferentialPrivacyAdaptiveBase
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT, compute_stdv

from common import protocol as wire
from common.config import DP_CLIENT_SIDE, RunConfig

log = logging.getLogger(__name__)

WEIGHT = "weight"  # the ballot's weight key
BALLOT = wire.SHARED  # a ballot is laid out as a training reply, for Flower's rules
CLIPPING_NORM_KEY = KEY_CLIPPING_NORM  # the config key that asks a client to clip (Flower's name)
NORM_BIT_KEY = KEY_NORM_BIT  # the ballot metric the adaptive wrapper counts (here: "within the clip")


def _combiners(cfg: RunConfig) -> dict[str, Callable[[], FedAvg]]:
    common: dict[str, Any] = {"weighted_by_key": WEIGHT, "arrayrecord_key": BALLOT, "train_metrics_aggr_fn": _no_metrics}
    f = cfg.num_malicious_nodes
    return {
        "fedavg": lambda: FedAvg(**common),
        "fedmedian": lambda: FedMedian(**common),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**common, beta=cfg.trimmed_beta),
        "krum": lambda: Krum(**common, num_malicious_nodes=f),
        "multikrum": lambda: MultiKrum(**common, num_malicious_nodes=f, num_nodes_to_select=cfg.multikrum_select),
        "bulyan": lambda: Bulyan(**common, num_malicious_nodes=f),
    }


def minimum_replies(cfg: RunConfig) -> int:
    """The fewest valid replies the chosen rule can combine (Blanchard et al.; El Mhamdi et al.)."""
    f = cfg.num_malicious_nodes
    return {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(cfg.aggregation, 1)


def _no_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    return MetricRecord()  # the strategy computes the reported metrics itself, from the real replies


class _Relay(FedAvg):
    """The strategy a DP wrapper wraps: its messages are the ones our strategy built (after the
    wrapper put its clipping norm into the config); its aggregation is FedAvg's own, unchanged,
    which is what Flower's accountant requires."""

    build: Callable[[ConfigRecord], list[Message]]

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        return self.build(config)


class _FreshNoise:
    """Noise from the operating system's entropy instead of numpy's global generator: DP noise
    must be unpredictable, and nothing in this project draws from a global RNG."""

    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int
    clipped_count_stddev: float

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        rng = np.random.default_rng(secrets.randbits(128))
        stdv = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        noisy = {k: a.numpy() + rng.normal(0.0, stdv, a.shape).astype(a.numpy().dtype) for k, a in aggregated.items()}
        log.info("DP: Gaussian noise of std %.4g added to the mean", stdv)
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in noisy.items()})

    def _noisy_fraction(self, count: int, total: int) -> float:
        rng = np.random.default_rng(secrets.randbits(128))
        return float(rng.normal(count, self.clipped_count_stddev)) / float(total)


class _FixedClipping(_FreshNoise, DifferentialPrivacyClientSideFixedClipping):
    pass


class _AdaptiveClipping(_FreshNoise, DifferentialPrivacyClientSideAdaptiveClipping):
    pass


class PrivacyBudgetSpent(RuntimeError):
    """The next round would exceed dp-max-epsilon, or the sample changed under a fixed budget."""


class Privacy:
    """A Flower DP wrapper around our messages and the FedAvg of the ballots, built at the first
    round (it needs the number of clients sampled per round)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.wrapper: DifferentialPrivacyFixedClippingBase | DifferentialPrivacyAdaptiveBase | None = None
        self.relay = _Relay(weighted_by_key=WEIGHT, arrayrecord_key=BALLOT, train_metrics_aggr_fn=_no_metrics)

    @property
    def client_side(self) -> bool:
        return self.cfg.dp in DP_CLIENT_SIDE

    def _build(self, num_sampled: int, population: int) -> DifferentialPrivacyFixedClippingBase | DifferentialPrivacyAdaptiveBase:
        cfg = self.cfg
        if cfg.dp.endswith("adaptive"):
            return _AdaptiveClipping(
                self.relay, cfg.dp_noise_multiplier, num_sampled, initial_clipping_norm=cfg.dp_clipping_norm,
                target_clipped_quantile=cfg.dp_target_quantile, clip_norm_lr=cfg.dp_clip_norm_lr,
            )
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=cfg.dp_target_delta,
                population_size=max(population, num_sampled),
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                # No credit for sampling: clients are not sampled by a Poisson process here.
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
                max_epsilon=cfg.dp_max_epsilon or None,
            )
        )
        return _FixedClipping(self.relay, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, num_sampled, accountant=accountant)

    def configure(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, nodes: list[int],
        build: Callable[[ConfigRecord], list[Message]],
    ) -> list[Message]:
        from flwr.serverapp.exception import PrivacyBudgetExhausted

        if self.wrapper is None:
            self.wrapper = self._build(len(nodes), len(list(grid.get_node_ids())))
        if not nodes:
            return []
        sampled = self.wrapper.num_sampled_clients
        if len(nodes) != sampled:
            raise PrivacyBudgetSpent(
                f"round {server_round} samples {len(nodes)} clients; the DP noise was calibrated for {sampled} "
                "(set min-train-nodes and fraction-train so that every round samples the same number)"
            )
        self.relay.build = build
        try:
            return list(self.wrapper.configure_train(server_round, arrays, config, grid))
        except PrivacyBudgetExhausted as err:
            raise PrivacyBudgetSpent(f"{err} (dp-max-epsilon={self.cfg.dp_max_epsilon:g})") from None

    @property
    def clipping_norm(self) -> float:
        """The clip in force this round (the adaptive wrapper moves it after each round)."""
        assert self.wrapper is not None
        return float(self.wrapper.clipping_norm)

    def aggregate(self, server_round: int, ballots: list[Message]) -> ArrayRecord | None:
        assert self.wrapper is not None
        arrays, _ = self.wrapper.aggregate_train(server_round, ballots)
        return arrays

    def record(self) -> dict[str, object]:
        """This round's privacy figures for metrics.jsonl: the clip in force and, for fixed
        clipping, the epsilon spent so far at dp-target-delta."""
        wrapper = self.wrapper
        if wrapper is None:
            return {}
        out: dict[str, object] = {
            "mechanism": self.cfg.dp,
            "noise-multiplier": float(wrapper.noise_multiplier),
            "clipping-norm": float(wrapper.clipping_norm),
            "sampled": int(wrapper.num_sampled_clients),
        }
        spent = wrapper.privacy_spent() if isinstance(wrapper, DifferentialPrivacyFixedClippingBase) else None
        if spent is not None:
            out.update({"epsilon": float(spent.epsilon), "delta": float(spent.delta), "releases": int(spent.num_releases)})
        else:
            out["epsilon"] = None  # Flower 1.41 has no accountant for adaptive clipping
        return out


class Combiner:
    """The round's aggregation rule, optionally under DP, applied to ballots."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.rule = _combiners(cfg)[cfg.aggregation]()
        self.privacy = Privacy(cfg) if cfg.dp != "off" else None

    def ballots(self, replies: Iterable[tuple[Message, Mapping[str, np.ndarray], int, bool | None]]) -> list[Message]:
        """One message per (reply, its shared tensors as they will be combined, its weight,
        under DP whether its update was within the clip)."""
        out = []
        for msg, arrays, weight, unclipped in replies:
            metrics: dict[str, int | float | list[int] | list[float]] = {WEIGHT: 1 if self.privacy else int(weight)}
            if unclipped is not None:
                metrics[NORM_BIT_KEY] = int(unclipped)
            content = RecordDict({BALLOT: ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}), wire.METRICS: MetricRecord(metrics)})
            # The reply's own metadata: an instruction would need a run context this code may lack.
            out.append(Message(content=content, metadata=copy.copy(msg.metadata)))  # type: ignore[call-overload]
        return out

    def combine(self, server_round: int, ballots: list[Message]) -> ArrayRecord | None:
        if self.privacy is not None:
            return self.privacy.aggregate(server_round, ballots)
        if len(ballots) < minimum_replies(self.cfg):
            log.warning(
                "round %d: %s with num-malicious-nodes=%d needs %d valid replies, got %d; the global state is unchanged",
                server_round, self.cfg.aggregation, self.cfg.num_malicious_nodes, minimum_replies(self.cfg), len(ballots),
            )
            return None
        arrays, _ = self.rule.aggregate_train(server_round, ballots)
        return arrays
