"""pFedMoAP: the server's expert selection and per-client messages, and the client's private gate."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from client.app import app
from client.runtime import pick_device, shared_model
from common.arrays import from_record
from common.config import RunConfig
from common.methods import method_for
from common.model.gate import ExpertGate
from common.model.roles import Role
from server.strategies.pfedmoap import PFedMoAPStrategy, select_experts
from server.validation import TensorSpec
from tests.conftest import Nodes
from tests.flower_messages import context, instruction, private_on_disk, wire_bytes
from tests.leaks import leaked_rows

KEY = "moap.prompt.ctx"
SHAPE = (1, 2, 3)


def _bank(values: dict[int, float]) -> dict[int, np.ndarray]:
    return {client: np.full(SHAPE, v, np.float32) for client, v in values.items()}


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_nearest_experts_are_the_closest_prompts_and_never_the_client_itself() -> None:
    bank = _bank({0: 0.0, 1: 1.0, 2: 3.0, 3: 0.5, 4: 10.0, 5: -0.7})
    assert select_experts(0, bank, k=3, how="nearest", rng=_rng()) == [3, 5]
    assert select_experts(4, bank, k=2, how="nearest", rng=_rng()) == [2]
    for client in bank:
        assert client not in select_experts(client, bank, k=4, how="nearest", rng=_rng())


def test_first_round_and_fewer_clients_than_k() -> None:
    assert select_experts(0, {}, k=10, how="nearest", rng=_rng()) == []  # nobody has uploaded yet
    bank = _bank({1: 1.0, 2: 2.0})
    assert select_experts(0, bank, k=10, how="nearest", rng=_rng()) == []  # client 0 never uploaded
    bank = _bank({0: 0.0, 1: 1.0, 2: 2.0})
    assert select_experts(0, bank, k=10, how="random", rng=_rng()) == [1, 2]  # K > N: every other client
    assert select_experts(0, bank, k=1, how="nearest", rng=_rng()) == []  # K = 1: the local prompt alone


def test_random_experts_are_seeded_and_exclude_the_client() -> None:
    bank = _bank({c: float(c) for c in range(10)})
    picks = [select_experts(3, bank, k=4, how="random", rng=_rng(seed)) for seed in range(20)]
    assert all(len(p) == 3 and 3 not in p and p == sorted(set(p)) for p in picks)
    assert picks[0] == select_experts(3, bank, k=4, how="random", rng=_rng(0))  # same seed, same pick
    assert len({tuple(p) for p in picks}) > 1  # and not always the same
    with pytest.raises(ValueError, match="pfedmoap-selection='best' is unknown"):
        select_experts(3, bank, k=4, how="best", rng=_rng())


def _strategy(experts: int = 2) -> PFedMoAPStrategy:
    return PFedMoAPStrategy({KEY: TensorSpec(SHAPE, "float32")}, num_rounds=3, experts=experts, selection="nearest", seed=0)


def _reply(node_id: int, partition_id: int, value: float, examples: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({KEY: Array(np.full(SHAPE, value, np.float32))}),
            "metrics": MetricRecord({"num-examples": examples, "partition-id": partition_id, "num-partitions": 3}),
        }
    )
    metadata = Metadata(
        run_id=1, message_id=f"r{node_id}", src_node_id=node_id, dst_node_id=1, reply_to_message_id="m",
        group_id="1", created_at=time.time(), ttl=60.0, message_type="train",
    )
    return Message(content=content, metadata=metadata)


@pytest.mark.usefixtures("server_task_identity")
def test_server_keeps_latest_prompts_and_personalises_messages() -> None:
    strategy = _strategy(experts=2)
    template = ArrayRecord({KEY: Array(np.zeros(SHAPE, np.float32))})
    # Round 1: nobody has uploaded, so nobody gets an expert.
    first = list(strategy.configure_train(1, template, ConfigRecord(), Nodes()))
    assert [len(m.content["experts"]) for m in first] == [0, 0, 0]
    arrays, _ = strategy.aggregate_train(1, [_reply(11, 0, 1.0, 10), _reply(12, 1, 2.0, 30), _reply(13, 2, 7.0, 60)])
    assert arrays is not None
    np.testing.assert_allclose(arrays[KEY].numpy(), np.average([1.0, 2.0, 7.0], weights=[10, 30, 60]), rtol=1e-6)
    assert set(strategy.bank) == {0, 1, 2}

    # Round 2: each client gets the average and its K - 1 = 1 nearest other prompt.
    second = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, arrays, ConfigRecord(), Nodes())}
    experts = {node: dict(from_record(m.content["experts"])) for node, m in second.items()}
    assert {node: sorted(e) for node, e in experts.items()} == {11: ["client-1"], 12: ["client-0"], 13: ["client-1"]}
    for node, msg in second.items():
        np.testing.assert_allclose(msg.content["arrays"][KEY].numpy(), arrays[KEY].numpy())
        own = strategy.partition_of[node]
        assert f"client-{own}" not in experts[node]  # never its own prompt as an expert
    assert strategy.stats(2).floats_down == {11: 12, 12: 12, 13: 12}  # global + one expert, 6 values each

    # Evaluation: every client is evaluated with its own latest prompt.
    evaluate = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(2, arrays, ConfigRecord(), Nodes())}
    for node, value in ((11, 1.0), (12, 2.0), (13, 7.0)):
        assert (evaluate[node].content["arrays"][KEY].numpy() == value).all()
    assert strategy.round_record(2)["experts"] == {"train": {"0": [1], "1": [0], "2": [1]}, "evaluate": {"0": [1], "1": [0], "2": [1]}}

    # The bank survives a resume through server_state.
    arrays_state, metadata = strategy.server_state()
    restored = _strategy(experts=2)
    restored.load_server_state(arrays_state, metadata)
    assert restored.partition_of == strategy.partition_of
    assert {k: v.tolist() for k, v in restored.bank.items()} == {k: v.tolist() for k, v in strategy.bank.items()}


def test_gate_is_private_and_learns_only_once_there_are_experts(run_config: dict[str, Any], tmp_path: Path) -> None:
    config = {**run_config, "method": "pfedmoap", "state-dir": str(tmp_path / "state"), "local-epochs": 1}
    cfg = RunConfig.from_flower(config)
    method = method_for(cfg)
    initial = method.initial_state()
    ctx = context(config, 0)

    first = app(instruction(initial[Role.SHARED], "train", 1, ctx.node_id), ctx)  # no experts yet
    assert not first.has_error(), first.error
    stored = private_on_disk(config, 0)
    assert set(stored) == set(initial[Role.PRIVATE]) and all(k.startswith("moap.gate.") for k in stored)
    assert all(torch.equal(stored[k], initial[Role.PRIVATE][k]) for k in stored)  # unused gate: unchanged

    msg = instruction(from_record(first.content["arrays"]), "train", 2, ctx.node_id)
    msg.content["experts"] = ArrayRecord({"client-1": initial[Role.SHARED][KEY] + 0.1, "client-2": initial[Role.SHARED][KEY] - 0.1})
    second = app(msg, ctx)
    assert not second.has_error(), second.error
    gate = private_on_disk(config, 0)
    assert all(not torch.equal(gate[k], stored[k]) for k in gate)  # every gate tensor learnt
    assert set(second.content["arrays"]) == {KEY}
    assert leaked_rows(wire_bytes(second), gate) == []
    model = shared_model(cfg, pick_device()).model
    assert all(torch.equal(v.cpu(), gate[k]) for k, v in method.roles.state(model, Role.PRIVATE).items())


def test_gate_dropout_draws_from_the_given_generator() -> None:
    torch.manual_seed(0)
    gate = ExpertGate(8, heads=2, scaling=10.0, dropout=0.5)
    query, experts = torch.randn(3, 4, 8), torch.randn(3, 5, 8)
    gate.train()
    a = gate(query, experts, torch.Generator().manual_seed(1))
    b = gate(query, experts, torch.Generator().manual_seed(1))
    c = gate(query, experts, torch.Generator().manual_seed(2))
    assert a.shape == (3, 4, 8) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="needs a seeded generator"):
        gate(query, experts)
    gate.eval()  # no dropout: the generator does not matter
    assert torch.equal(gate(query, experts), gate(query, experts, torch.Generator().manual_seed(5)))


class QueriedGrid:
    """Connected nodes that answer query messages through the real ClientApp."""

    def __init__(self, run_config: dict[str, Any], partitions: dict[int, int]) -> None:
        self.run_config, self.partitions = run_config, partitions
        self.queried: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.partitions)

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        replies = []
        for msg in messages:
            assert msg.metadata.message_type == "query" and not msg.content.array_records
            node = msg.metadata.dst_node_id
            self.queried.append(node)
            replies.append(app(instruction({}, "query", 0, node), context(self.run_config, self.partitions[node])))
        return replies


@pytest.mark.usefixtures("server_task_identity")
def test_a_resumed_server_asks_unknown_nodes_who_they_are(run_config: dict[str, Any]) -> None:
    # In a resumed run (or after a node restart) node ids are new, but the bank is keyed by client.
    saved = _strategy(experts=2)
    saved.bank = _bank({0: 0.0, 1: 1.0, 2: 5.0})
    arrays_state, metadata = saved.server_state()
    resumed = _strategy(experts=2)
    resumed.load_server_state(arrays_state, metadata)
    grid = QueriedGrid(run_config, {21: 0, 22: 1, 23: 2})
    template = ArrayRecord({KEY: Array(np.zeros(SHAPE, np.float32))})
    sent = {m.metadata.dst_node_id: m for m in resumed.configure_train(5, template, ConfigRecord(), grid)}
    assert sorted(grid.queried) == [21, 22, 23] and resumed.partition_of == {21: 0, 22: 1, 23: 2}
    assert {node: sorted(m.content["experts"]) for node, m in sent.items()} == {
        21: ["client-1"], 22: ["client-0"], 23: ["client-1"]
    }
    list(resumed.configure_evaluate(5, template, ConfigRecord(), grid))
    assert len(grid.queried) == 3  # known nodes are not asked again
