"""The server strategy: weighted averaging of shared tensors and reply validation."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from common.arrays import to_record
from common.config import RunConfig
from common.methods import METHODS, method_for
from common.model.roles import Role
from server.strategies import STRATEGIES, SharedFedAvg
from server.validation import specs_of
from tests.conftest import Nodes

SHAPES = {"mma.shared.1.linear.weight": (4, 4), "mma.shared.1.linear.bias": (4,)}


def _arrays(rng: np.random.Generator, overrides: dict[str, np.ndarray | None] | None = None) -> dict[str, np.ndarray]:
    """Random shared tensors; an override of None removes that key."""
    arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    for key, value in (overrides or {}).items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    return arrays


def _reply(node_id: int, arrays: dict[str, np.ndarray], num_examples: int = 10, pid: int | None = None) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": float(node_id), "partition-id": node_id if pid is None else pid}),
        }
    )
    return Message(content=content, metadata=_metadata(node_id))


def _metadata(node_id: int) -> Metadata:
    return Metadata(
        run_id=1, message_id=f"r{node_id}", src_node_id=node_id, dst_node_id=1, reply_to_message_id="m",
        group_id="1", created_at=time.time(), ttl=60.0, message_type="train",
    )


@pytest.fixture
def strategy() -> SharedFedAvg:
    template = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    return SharedFedAvg(specs_of(template), num_rounds=3)


def test_aggregation_is_example_weighted_mean(strategy: SharedFedAvg) -> None:
    rng = np.random.default_rng(0)
    clients = [_arrays(rng) for _ in range(3)]
    weights = [5, 20, 75]
    replies = [_reply(i + 10, a, w) for i, (a, w) in enumerate(zip(clients, weights))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    for key in SHAPES:
        expected = np.average(np.stack([c[key] for c in clients]), axis=0, weights=weights)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)
        assert arrays[key].numpy().dtype == np.float32
    assert metrics["train-loss"] == pytest.approx(np.average([10, 11, 12], weights=weights))
    assert "partition-id" not in metrics
    assert strategy.stats(1).valid == 3 and not strategy.stats(1).rejected


W, B = "mma.shared.1.linear.weight", "mma.shared.1.linear.bias"
BAD_REPLIES: dict[str, dict[str, np.ndarray | None]] = {
    "extra key": {"mma.down.text.1.linear.weight": np.ones((4, 4), np.float32)},  # a private tensor
    "missing key": {B: None},
    "wrong shape": {W: np.ones((4, 5), np.float32)},
    "wrong dtype": {W: np.ones((4, 4), np.float64)},
    "NaN": {B: np.array([0, np.nan, 0, 0], np.float32)},
    "Inf": {W: np.full((4, 4), np.inf, np.float32)},
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_invalid_reply_is_rejected_and_not_averaged(strategy: SharedFedAvg, case: str) -> None:
    rng = np.random.default_rng(1)
    good = [_arrays(rng), _arrays(rng)]
    bad = _arrays(rng, BAD_REPLIES[case])
    replies = [_reply(1, good[0], 10), _reply(2, bad, 1000), _reply(3, good[1], 30)]
    arrays, _ = strategy.aggregate_train(4, replies)
    assert arrays is not None
    for key in SHAPES:
        expected = np.average(np.stack([g[key] for g in good]), axis=0, weights=[10, 30])
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    stats = strategy.stats(4)
    assert stats.valid == 2 and list(stats.rejected) == ["2"]


def test_bad_weight_and_error_replies_are_rejected(strategy: SharedFedAvg) -> None:
    rng = np.random.default_rng(2)
    zero_weight = _reply(5, _arrays(rng), num_examples=0)
    failed = Message(metadata=_metadata(6), error=Error(code=0, reason="CUDA out of memory"))
    arrays, metrics = strategy.aggregate_train(2, [zero_weight, failed])
    assert arrays is None and metrics is None  # global state stays unchanged
    reasons = strategy.stats(2).rejected
    assert "num-examples=0" in reasons["5"]
    assert any("CUDA out of memory" in r for r in reasons.values())


def test_local_accuracy_is_unweighted_mean_over_clients(strategy: SharedFedAvg) -> None:
    replies = []
    for pid, (acc, n) in enumerate([(0.5, 10), (1.0, 1000)]):
        content = RecordDict({"metrics": MetricRecord({"local-accuracy": acc, "num-examples": n, "partition-id": pid})})
        replies.append(Message(content=content, metadata=_metadata(pid + 1)))
    strategy.trained.update({0, 1})
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None and metrics["local-accuracy"] == pytest.approx(0.75)
    assert strategy.stats(1).local_accuracy == {0: 0.5, 1: 1.0}


def _evaluation(pid: int, local: float) -> Message:
    content = RecordDict({"metrics": MetricRecord({"local-accuracy": local, "num-examples": 10, "partition-id": pid})})
    return Message(content=content, metadata=_metadata(pid + 1))


def test_a_client_that_never_trained_is_left_out_of_the_means(strategy: SharedFedAvg) -> None:
    rng = np.random.default_rng(3)
    # Client 2's training fails (an error reply); clients 0 and 1 train.
    failed = Message(metadata=_metadata(3), error=Error(code=2, reason="ClientApp raised an exception"))
    strategy.aggregate_train(1, [_reply(1, _arrays(rng), 10, pid=0), _reply(2, _arrays(rng), 10, pid=1), failed])
    metrics = strategy.aggregate_evaluate(1, [_evaluation(0, 0.8), _evaluation(1, 0.6), _evaluation(2, 0.05)])
    stats = strategy.stats(1)
    assert metrics is not None and metrics["local-accuracy"] == pytest.approx(0.7)  # not (0.8 + 0.6 + 0.05) / 3
    assert metrics["num-clients"] == 2
    assert stats.excluded == {2: "never trained in this run"} and set(stats.evaluation) == {0, 1, 2}
    assert strategy.round_failure(1) is None  # a transient failure of one client keeps the run going


def test_a_permanent_client_error_or_a_round_without_valid_replies_fails_the_run(strategy: SharedFedAvg) -> None:
    from common.errors import PERMANENT_ERROR_CODE

    rng = np.random.default_rng(4)
    strategy.aggregate_train(1, [_reply(1, _arrays(rng), 10, pid=0)])  # node 1 is client 0
    bad_data = Message(metadata=_metadata(1), error=Error(code=PERMANENT_ERROR_CODE, reason="client 0: DatasetError: cannot read image /d/x.jpg"))
    strategy.aggregate_train(2, [bad_data, _reply(2, _arrays(rng), 10, pid=1)])
    assert strategy.stats(2).permanent == {"client 0": "DatasetError: cannot read image /d/x.jpg"}
    assert "1 client(s) failed with an error that would repeat" in (strategy.round_failure(2) or "")

    transient = Message(metadata=_metadata(2), error=Error(code=5, reason="Node Unavailable"))
    strategy.stats(3).sampled_train = 2
    strategy.aggregate_train(3, [transient])
    assert strategy.stats(3).permanent == {}
    assert strategy.round_failure(3) == "no valid training reply from the 2 sampled client(s)"


@pytest.mark.usefixtures("server_task_identity")
def test_schedule_offset_and_client_config_reach_the_messages() -> None:
    template = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    strategy = SharedFedAvg(specs_of(template), num_rounds=7, eval_every=3, round_offset=4, client_config={"state-namespace": "exp-a"})
    assert [r for r in range(1, 8) if strategy.is_full_eval_round(r)] == [3, 6, 7]
    train = list(strategy.configure_train(1, template, ConfigRecord(), Nodes()))
    assert len(train) == 3
    for msg in train:
        assert msg.content["config"]["server-round"] == 5  # loop round 1 after 4 completed rounds
        assert msg.content["config"]["state-namespace"] == "exp-a"
        assert set(msg.content["arrays"]) == set(SHAPES)  # only the shared tensors go out
    evaluate = list(strategy.configure_evaluate(2, template, ConfigRecord(), Nodes()))
    assert all(m.content["config"]["full-eval"] is True for m in evaluate)  # real round 6
    assert strategy.stats(5).sampled_train == 3 and strategy.stats(6).full_eval


def test_errors_from_one_source_are_all_counted(strategy: SharedFedAvg) -> None:
    # The SuperLink answers for every unavailable node with its own id: none may overwrite another.
    unavailable = [Message(metadata=_metadata(1), error=Error(code=0, reason="Node Unavailable")) for _ in range(2)]
    strategy.aggregate_train(3, unavailable)
    assert strategy.stats(3).rejected == {"1": "error reply: Node Unavailable", "1#2": "error reply: Node Unavailable"}


AVERAGING = [name for name, cls in METHODS.items() if cls.trains]


@pytest.mark.parametrize("name", AVERAGING)
def test_every_method_averages_its_shared_set_by_examples(tiny_cfg: RunConfig, name: str) -> None:
    cfg = tiny_cfg.model_copy(update={"method": name})
    method = method_for(cfg)
    template = to_record(method.initial_state()[Role.SHARED])
    strategy = STRATEGIES[method.strategy].from_config(cfg, specs_of(template), num_rounds=3)
    rng = np.random.default_rng(7)
    clients = [{k: rng.normal(size=a.shape).astype(np.float32) for k, a in template.items()} for _ in range(3)]
    weights = [3, 40, 17]
    arrays, metrics = strategy.aggregate_train(1, [_reply(20 + i, c, w) for i, (c, w) in enumerate(zip(clients, weights))])
    assert arrays is not None and metrics is not None and strategy.stats(1).valid == 3
    assert set(arrays) == set(template)  # local: the empty set
    for key in template:
        expected = np.average(np.stack([c[key] for c in clients]), axis=0, weights=weights)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert metrics["num-examples"] == sum(weights)
    # A reply carrying a tensor outside the method's shared set is rejected.
    private = method.initial_state()[Role.PRIVATE]
    if private:
        name_, tensor = next(iter(private.items()))
        leaking = {**clients[0], name_: tensor.numpy()}
        strategy.aggregate_train(2, [_reply(30, leaking, 5)])
        assert "unexpected keys (not shared tensors)" in strategy.stats(2).rejected["30"]


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1.5, -2, 2**40])
def test_reported_identifiers_are_read_only_when_integral_and_bounded(strategy: SharedFedAvg, bad: float) -> None:
    # A client's "partition-id" of inf must not crash the server in int(); it is not believed either.
    content = RecordDict({"metrics": MetricRecord({"local-accuracy": 0.5, "num-examples": 3, "partition-id": bad, "num-partitions": bad})})
    strategy.trained.add(7)  # as if node 7's training had been accepted
    metrics = strategy.aggregate_evaluate(1, [Message(content=content, metadata=_metadata(7))])
    finite = bool(np.isfinite(bad))
    if finite:  # a finite but impossible id is not believed; the evaluation itself stands
        assert metrics is not None and strategy.stats(1).evaluation == {7: {"local": 0.5}}  # keyed by node id
    else:  # a reply reporting a non-finite number is dropped whole
        assert metrics is None and "expected a finite number" in strategy.stats(1).rejected["7"]
    assert strategy.partition_of == {} and strategy.stats(1).num_partitions == set()
    rng = np.random.default_rng(3)
    reply = _reply(8, _arrays(rng), 4)
    reply.content["metrics"]["partition-id"] = bad
    reply.content["metrics"]["private-source"] = bad
    arrays, _ = strategy.aggregate_train(2, [reply])
    assert (arrays is not None) == finite
    assert strategy.partition_of == {} and strategy.stats(2).private_sources == {}


def test_the_average_is_bit_identical_whatever_order_replies_arrive_in(strategy: SharedFedAvg) -> None:
    # Values whose float sum depends on its order: replies are averaged in partition-id order.
    rng = np.random.default_rng(0)
    replies = {n: {k: (rng.standard_normal(s) * 10.0 ** rng.integers(-3, 4)).astype(np.float32) for k, s in SHAPES.items()} for n in range(5)}
    results = []
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [3, 4, 1, 0, 2]):
        arrays, _ = strategy.aggregate_train(1, [_reply(n, replies[n], num_examples=7 + n) for n in order])
        assert arrays is not None
        results.append({k: v.numpy() for k, v in arrays.items()})
    for other in results[1:]:
        assert all(np.array_equal(results[0][k], other[k]) for k in SHAPES)


@pytest.mark.parametrize("rename", ["metrics", "arrays"])
def test_a_reply_is_read_by_the_contracts_record_names(strategy: SharedFedAvg, rename: str) -> None:
    """A record under another name than common.protocol's is rejected with a bounded reason; it used
    to pass validation (records read by position) and then crash the ServerApp (read by name)."""
    from common import protocol as wire

    rng = np.random.default_rng(0)
    good = _reply(11, _arrays(rng))
    odd = _reply(12, _arrays(rng))
    assert rename in (wire.METRICS, wire.SHARED)
    name = "x" * 100_000 + "\n[pfedmma] round 5/5 forged"
    content = RecordDict({(name if k == rename else k): v for k, v in odd.content.items()})
    arrays, _ = strategy.aggregate_train(1, [good, Message(content=content, metadata=_metadata(12))])
    assert arrays is not None  # the valid reply alone was averaged; nothing raised
    (reason,) = strategy.stats(1).rejected.values()
    assert f"named {rename!r}" in reason and len(reason) < 300 and "\n" not in reason.replace("\\n", "")
