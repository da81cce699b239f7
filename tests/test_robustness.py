"""What one client may claim, how replies are combined (Flower's robust rules, DP wrappers),
and what a client refuses from the server."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.guards import UntrustedGlobalStateError, check_received, clip_for_dp
from common.config import ConfigError, RunConfig
from server.aggregation import CLIPPING_NORM_KEY, Combiner, PrivacyBudgetSpent
from server.strategies import SharedFedAvg
from server.validation import ReplyLimits, count_problem, metrics_problem, specs_of
from tests.conftest import Nodes
from tests.test_strategy import SHAPES, _arrays, _metadata, _reply


def _strategy(limits: ReplyLimits | None = None, **config) -> SharedFedAvg:
    template = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    cfg = RunConfig.model_validate(config)
    kwargs = SharedFedAvg.config_kwargs(cfg)
    if limits is not None:
        kwargs["limits"] = limits
    return SharedFedAvg(specs_of(template), num_rounds=5, min_train_nodes=3, min_available_nodes=3, **kwargs)


def _global(rng: np.random.Generator) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in _arrays(rng).items()})


@pytest.mark.parametrize(
    ("value", "problem"),
    [(10, None), (3.0, None), (0, "expected 1 to 100"), (101, "expected 1 to 100"), (10**12, "expected 1 to 100"),
     (float("inf"), "integer"), (float("nan"), "integer"), (3.5, "integer"), (True, "integer"), ("7", "integer")],
)
def test_example_counts_must_be_integers_within_the_cap(value: object, problem: str | None) -> None:
    found = count_problem(value, "num-examples", 100)
    assert (found is None) if problem is None else (problem in (found or ""))


def test_reported_numbers_must_be_finite_and_accuracies_in_the_unit_interval() -> None:
    assert metrics_problem(MetricRecord({"local-accuracy": 0.5, "train-loss": 3.0, "partition-id": 2})) is None
    assert "finite" in (metrics_problem(MetricRecord({"train-loss": float("inf")})) or "")
    assert "[0, 1]" in (metrics_problem(MetricRecord({"base-accuracy": 1.5})) or "")
    assert "[0, 1]" in (metrics_problem(MetricRecord({"novel-accuracy": -0.1})) or "")


def test_a_huge_count_cannot_erase_the_other_clients(server_task_identity: None) -> None:
    strategy, rng = _strategy(ReplyLimits(max_examples=50, update_norm_bound=0.0)), np.random.default_rng(0)
    strategy.configure_train(1, _global(rng), ConfigRecord(), Nodes())
    honest = [_reply(11, _arrays(rng), 20), _reply(12, _arrays(rng), 30)]
    arrays, metrics = strategy.aggregate_train(1, [*honest, _reply(13, _arrays(rng), 10**12)])
    expected = {k: (20 * honest[0].content["arrays"][k].numpy() + 30 * honest[1].content["arrays"][k].numpy()) / 50 for k in SHAPES}
    assert arrays is not None and all(np.allclose(arrays[k].numpy(), expected[k], atol=1e-6) for k in SHAPES)
    assert "expected 1 to 50" in strategy.stats(1).rejected["13"]
    assert metrics is not None and metrics["num-examples"] == 50


def test_values_beyond_max_parameter_abs_are_rejected(server_task_identity: None) -> None:
    strategy, rng = _strategy(), np.random.default_rng(1)
    strategy.configure_train(1, _global(rng), ConfigRecord(), Nodes())
    poisoned = _arrays(rng, {"mma.shared.1.linear.bias": np.full(4, 1e30, np.float32)})
    arrays, _ = strategy.aggregate_train(1, [_reply(11, _arrays(rng)), _reply(12, poisoned)])
    assert arrays is not None and max(float(np.abs(a.numpy()).max()) for a in arrays.values()) < 10
    assert "above max-parameter-abs=1000" in strategy.stats(1).rejected["12"]


@pytest.mark.parametrize("action", ["reject", "clip"])
def test_an_oversized_update_is_rejected_or_clipped_to_the_bound(server_task_identity: None, action: str) -> None:
    strategy, rng = _strategy(update_norm_bound=2.0, update_norm_action=action), np.random.default_rng(2)
    start = _global(rng)
    reference = {k: a.numpy() for k, a in start.items()}
    strategy.configure_train(1, start, ConfigRecord(), Nodes())
    norm = float(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in reference.values())))
    small = {k: v + 0.01 for k, v in reference.items()}
    big = {k: v + 10 * norm for k, v in reference.items()}  # far above 2x the global's norm
    arrays, _ = strategy.aggregate_train(1, [_reply(11, small), _reply(12, big)])
    assert arrays is not None
    stats = strategy.stats(1)
    if action == "reject":
        assert "above update-norm-bound=2" in stats.rejected["12"]
        assert all(np.allclose(arrays[k].numpy(), small[k]) for k in SHAPES)
    else:
        assert not stats.rejected and list(stats.clipped) == ["12"]
        combined_update = {k: 2 * arrays[k].numpy().astype(np.float64) - small[k] - reference[k] for k in SHAPES}
        clipped_norm = float(np.sqrt(sum((v**2).sum() for v in combined_update.values())))
        assert clipped_norm == pytest.approx(2.0 * norm, rel=1e-4)  # the big reply moved exactly to the bound
    assert set(stats.update_norms) == {"11", "12"}  # keyed by the partition id the replies report


def test_fedmedian_is_the_coordinate_median_of_the_shared_tensors(server_task_identity: None) -> None:
    strategy, rng = _strategy(aggregation="fedmedian"), np.random.default_rng(3)
    start = _global(rng)
    strategy.configure_train(1, start, ConfigRecord(), Nodes())
    replies = [{k: v + rng.normal(scale=0.01, size=v.shape).astype(np.float32) for k, v in ((k, a.numpy()) for k, a in start.items())} for _ in range(3)]
    replies[2] = {k: v + 5.0 for k, v in replies[2].items()}  # an outlier, inside every bound
    arrays, _ = strategy.aggregate_train(1, [_reply(11 + i, r, 10 * (i + 1)) for i, r in enumerate(replies)])
    assert arrays is not None
    for k in SHAPES:
        assert np.allclose(arrays[k].numpy(), np.median(np.stack([r[k] for r in replies]), axis=0))


def test_krum_picks_an_honest_reply_and_bulyan_needs_enough_replies(server_task_identity: None) -> None:
    rng = np.random.default_rng(4)
    start = _global(rng)
    base = {k: a.numpy() for k, a in start.items()}
    honest = [{k: v + rng.normal(scale=0.01, size=v.shape).astype(np.float32) for k, v in base.items()} for _ in range(4)]
    attacker = {k: v + 3.0 for k, v in base.items()}
    strategy = _strategy(aggregation="krum", num_malicious_nodes=1)
    strategy.configure_train(1, start, ConfigRecord(), Nodes())
    replies = [_reply(11 + i, r) for i, r in enumerate([*honest, attacker])]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert any(all(np.array_equal(arrays[k].numpy(), h[k]) for k in SHAPES) for h in honest)
    bulyan = _strategy(aggregation="bulyan", num_malicious_nodes=1)  # needs 4f + 3 = 7 replies
    bulyan.configure_train(1, start, ConfigRecord(), Nodes())
    arrays, _ = bulyan.aggregate_train(1, [_reply(11 + i, r) for i, r in enumerate([*honest, attacker])])
    assert arrays is None  # too few replies: the global state is left unchanged


def test_dp_needs_fedavg() -> None:
    with pytest.raises(ConfigError, match="dp='server-fixed' needs aggregation='fedavg'"):
        RunConfig.from_flower({"dp": "server-fixed", "aggregation": "krum"})


def test_server_side_dp_clips_adds_noise_and_accounts_epsilon_per_round(server_task_identity: None) -> None:
    strategy = _strategy(dp="server-fixed", dp_clipping_norm=0.5, dp_noise_multiplier=1.0)
    rng = np.random.default_rng(5)
    spent = []
    for server_round in (1, 2):
        start = _global(rng)
        strategy.configure_train(server_round, start, ConfigRecord(), Nodes())
        replies = [_reply(11 + i, {k: a.numpy() + 3.0 for k, a in start.items()}, 10 * (i + 1)) for i in range(3)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert arrays is not None
        record = strategy.round_record(server_round)["privacy"]
        assert record["mechanism"] == "server-fixed" and record["sampled"] == 3 and record["releases"] == server_round
        spent.append(record["epsilon"])
    assert 0 < spent[0] < spent[1]  # epsilon grows with every release


def test_dp_noise_has_the_calibrated_spread(server_task_identity: None) -> None:
    # Enough values to measure the noise: every reply equals the global, so the mean is the global plus noise.
    shapes = {"w": (200, 100)}
    template = ArrayRecord({"w": Array(np.zeros(shapes["w"], np.float32))})
    cfg = RunConfig.model_validate({"dp": "server-fixed", "dp-clipping-norm": 2.0, "dp-noise-multiplier": 0.5})
    strategy = SharedFedAvg(specs_of(template), num_rounds=1, min_train_nodes=3, min_available_nodes=3, **SharedFedAvg.config_kwargs(cfg))
    strategy.configure_train(1, template, ConfigRecord(), Nodes())
    replies = []
    for node in (11, 12, 13):
        content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(shapes["w"], np.float32))}), "metrics": MetricRecord({"num-examples": 5})})
        replies.append(Message(content=content, metadata=_metadata(node)))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert float(arrays["w"].numpy().std()) == pytest.approx(0.5 * 2.0 / 3, rel=0.05)


def test_client_side_dp_sends_the_norm_and_refuses_an_unclipped_reply(server_task_identity: None) -> None:
    strategy, rng = _strategy(dp="client-fixed", dp_clipping_norm=0.1), np.random.default_rng(6)
    start = _global(rng)
    messages = list(strategy.configure_train(1, start, ConfigRecord(), Nodes()))
    assert all(m.content["config"][CLIPPING_NORM_KEY] == 0.1 for m in messages)
    sent = {k: torch.from_numpy(a.numpy()) for k, a in start.items()}
    trained = {k: v + 1.0 for k, v in sent.items()}
    clipped = clip_for_dp(trained, sent, dict(messages[0].content["config"]), "client-fixed")
    update = torch.sqrt(sum(((clipped[k] - sent[k]).double() ** 2).sum() for k in sent))
    assert float(update) == pytest.approx(0.1, rel=1e-5)
    honest = [_reply(11, {k: v.numpy() for k, v in clipped.items()}), _reply(12, {k: v.numpy() for k, v in clipped.items()})]
    unclipped = _reply(13, {k: v.numpy() for k, v in trained.items()})
    strategy.aggregate_train(1, [*honest, unclipped])
    assert "above the DP clipping norm" in strategy.stats(1).rejected["13"]


def test_a_spent_privacy_budget_stops_before_the_next_round(server_task_identity: None) -> None:
    strategy, rng = _strategy(dp="server-fixed", dp_max_epsilon=1e-3), np.random.default_rng(7)
    with pytest.raises(PrivacyBudgetSpent, match="max_epsilon"):
        strategy.configure_train(1, _global(rng), ConfigRecord(), Nodes())


def test_combiner_ballots_carry_only_shared_tensors_and_weights() -> None:
    rng = np.random.default_rng(8)
    reply = _reply(11, _arrays(rng), 7)
    (ballot,) = Combiner(RunConfig.model_validate({})).ballots([(reply, _arrays(rng), 7, None)])
    assert set(ballot.content["arrays"]) == set(SHAPES) and dict(ballot.content["metrics"]) == {"weight": 7}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_a_client_refuses_a_poisoned_global_state(bad: float) -> None:
    tensors = {"a": torch.zeros(3), "b": torch.tensor([0.0, bad])}
    with pytest.raises(UntrustedGlobalStateError, match="global shared tensor b"):
        check_received(tensors, 1000.0, "global shared tensor")
    check_received({"a": torch.ones(3)}, 1000.0, "global shared tensor")  # a plausible state passes


@pytest.mark.parametrize("mode", ["server-adaptive", "client-adaptive"])
def test_adaptive_clipping_moves_the_clip_towards_the_target_quantile(server_task_identity: None, mode: str) -> None:
    # Every update is far above the initial clip: the clip grows round after round.
    strategy = _strategy(dp=mode, dp_clipping_norm=0.01, dp_noise_multiplier=0.1, dp_target_quantile=0.5)
    rng = np.random.default_rng(9)
    clips = []
    for server_round in (1, 2, 3):
        start = _global(rng)
        messages = list(strategy.configure_train(server_round, start, ConfigRecord(), Nodes()))
        clips.append(strategy.combiner.privacy.clipping_norm)
        sent = {k: torch.from_numpy(a.numpy()) for k, a in start.items()}
        replies = []
        for i, message in enumerate(messages):
            trained = {k: v + 1.0 for k, v in sent.items()}
            if mode == "client-adaptive":
                trained = clip_for_dp(trained, sent, dict(message.content["config"]), mode)
            replies.append(_reply(11 + i, {k: v.numpy() for k, v in trained.items()}))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert arrays is not None and not strategy.stats(server_round).rejected
        assert strategy.round_record(server_round)["privacy"]["epsilon"] is None  # Flower 1.41 accounts fixed clipping only
    assert clips[0] < clips[1] < clips[2]


def test_a_lost_node_is_named_by_the_instruction_it_did_not_answer(server_task_identity: None) -> None:
    from flwr.app import Error, Metadata

    strategy, rng = _strategy(), np.random.default_rng(10)
    messages = list(strategy.configure_train(1, _global(rng), ConfigRecord(), Nodes()))
    for m in messages:  # what the Grid does when it pushes them
        m.metadata.__dict__["_message_id"] = f"sent-to-{m.metadata.dst_node_id}"
    # The SuperLink answers for a node it declared dead, from its own id (0 here).
    metadata = Metadata(
        run_id=1, message_id="x", src_node_id=0, dst_node_id=1, reply_to_message_id="sent-to-12",
        group_id="1", created_at=0.0, ttl=60.0, message_type="train",
    )
    dead = Message(Error(code=0, reason="Node Unavailable"), metadata=metadata)
    strategy.aggregate_train(1, [_reply(11, _arrays(rng)), dead, _reply(13, _arrays(rng))])
    assert list(strategy.stats(1).rejected) == ["12"] and "Node Unavailable" in strategy.stats(1).rejected["12"]


def test_a_reported_domain_name_is_bounded() -> None:
    strategy = _strategy()
    content = RecordDict({"metrics": MetricRecord({"local-accuracy": 0.5, "partition-id": 4}), "client": ConfigRecord({"domain": "x" * 10**6})})
    strategy.aggregate_evaluate(1, [Message(content=content, metadata=_metadata(4))])
    assert strategy.stats(1).domains == {4: "x" * 100}
