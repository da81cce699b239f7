"""The ClientApp, called with real Flower Messages: training, privacy, private state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import RecordDict

from client.app import ClientJob, app
from client.runtime import pick_device, shared_model
from client.state_store import DivergedError, PrivateStateError, PrivateStateStore
from common.arrays import from_record
from common.config import RunConfig
from common.methods import method_for
from common.methods.pfedmma import PFedMMA
from common.model.roles import Role
from tests.flower_messages import context, instruction, private_on_disk, wire_bytes


@pytest.fixture
def initial(tiny_cfg: RunConfig) -> dict[Role, dict[str, torch.Tensor]]:
    return method_for(tiny_cfg).initial_state()


def _train(run_config: dict[str, Any], shared, server_round: int, partition_id: int, state: RecordDict | None = None):
    ctx = context(run_config, partition_id, state=state)
    reply = app(instruction(shared, "train", server_round, node_id=ctx.node_id), ctx)
    assert not reply.has_error(), reply.error
    return reply, ctx


def test_train_reply_carries_only_shared_tensors(run_config, tiny_cfg, initial) -> None:
    shared = initial[Role.SHARED]
    for server_round in (1, 2):
        replies = []
        for pid in (0, 1):
            reply, _ = _train(run_config, shared, server_round, pid)
            replies.append(from_record(reply.content.array_records["arrays"]))
            assert list(reply.content.array_records) == ["arrays"]
            assert set(reply.content["arrays"]) == set(shared)
            assert set(reply.content.metric_records["metrics"]) == {"num-examples", "train-loss", "train-accuracy", "partition-id", "num-partitions", "private-source", "skipped-images"}
            # Besides tensors and numbers, only the device report: strings and numbers about the machine.
            assert set(reply.content.config_records) == {"device"}
            assert set(reply.content["device"]) >= {"type", "dtype", "name", "peak-memory-mb"}
            # No private tensor's values appear anywhere in what the reply puts on the wire.
            blob = wire_bytes(reply)
            private = private_on_disk(run_config, pid)
            assert set(private) == set(initial[Role.PRIVATE])
            for name, tensor in private.items():
                rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(1, -1)
                for row in rows[:4]:
                    assert row.numpy().tobytes() not in blob, f"private {name} leaked"
        shared = {k: (replies[0][k] + replies[1][k]) / 2 for k in shared}


def test_training_changes_only_adapter_tensors(run_config, tiny_cfg, initial) -> None:
    model = shared_model(tiny_cfg, pick_device()).model
    roles = PFedMMA.roles.of(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    reply, _ = _train(run_config, initial[Role.SHARED], 1, partition_id=0)

    after = dict(model.named_parameters())
    for name, role in roles.items():
        if role is Role.FROZEN:
            assert torch.equal(after[name], before[name]), f"frozen {name} changed"
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    for role in (Role.PRIVATE, Role.SHARED):
        names = [n for n, r in roles.items() if r is role]
        assert any(not torch.equal(after[n], before[n]) for n in names), f"no {role.value} tensor moved"
    sent = from_record(reply.content["arrays"])
    assert any(not torch.equal(sent[k], initial[Role.SHARED][k]) for k in sent)


def test_private_state_survives_rounds_restart_and_starts_from_init(run_config, tiny_cfg, initial) -> None:
    state = RecordDict()
    _, ctx = _train(run_config, initial[Role.SHARED], 1, partition_id=0, state=state)
    stored = private_on_disk(run_config, 0)
    assert any(not torch.equal(stored[k], initial[Role.PRIVATE][k]) for k in stored)
    # Kept on disk only: nothing private rides in the context the ClientApp hands back to its SuperNode.
    assert not ctx.state.array_records and not ctx.state.config_records

    # Another client trains in between on the same cached model...
    _train(run_config, initial[Role.SHARED], 1, partition_id=1)

    # ...and client 0's next round (same process, or a restarted node) starts from its own adapters.

    job = ClientJob.from_context(context(run_config, 0, state=RecordDict()))
    assert job.load_state(initial[Role.SHARED]) == "disk"
    assert all(torch.equal(v.cpu(), stored[k]) for k, v in PFedMMA.roles.state(job.bundle.model, Role.PRIVATE).items())

    # A client that never trained starts from the common initialisation.
    job = ClientJob.from_context(context(run_config, 2))
    assert job.load_state(initial[Role.SHARED]) == "init"
    assert all(torch.equal(v.cpu(), initial[Role.PRIVATE][k]) for k, v in PFedMMA.roles.state(job.bundle.model, Role.PRIVATE).items())


def test_evaluate_reply_has_metrics_only(run_config, initial) -> None:
    ctx = context(run_config, 1)
    reply = app(instruction(initial[Role.SHARED], "evaluate", 1, ctx.node_id), ctx)
    assert not reply.content.array_records
    metrics = reply.content.metric_records["metrics"]
    for name in ("local", "base", "novel"):  # full protocol by default (base-to-novel)
        assert 0.0 <= metrics[f"{name}-accuracy"] <= 1.0
    assert metrics["num-examples"] > 0


def _store(tmp_path: Path, fingerprint: dict[str, str] | None = None) -> PrivateStateStore:
    return PrivateStateStore(tmp_path, "exp", 0, fingerprint or {"model-name": "m"})


def test_state_file_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = {"w": torch.ones(3)}
    _store(tmp_path).save(old)

    import client.state_store as module

    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _store(tmp_path).save({"w": torch.zeros(3)})
    monkeypatch.undo()

    loaded, source = _store(tmp_path).load()
    assert source == "disk" and torch.equal(loaded["w"], old["w"])
    assert [p.name for p in (tmp_path / "exp").iterdir()] == ["client-0.safetensors"]


def test_state_file_of_another_model_is_refused(tmp_path: Path) -> None:
    _store(tmp_path, {"model-name": "a"}).save({"w": torch.ones(1)})
    with pytest.raises(PrivateStateError, match="client-0.safetensors.*experiment-name"):
        _store(tmp_path, {"model-name": "b"}).load()


def test_another_namespace_starts_from_init(run_config, initial) -> None:
    _train(run_config, initial[Role.SHARED], 1, partition_id=0)

    job = ClientJob.from_context(context(run_config, 0), namespace="another-experiment")
    assert job.load_state(initial[Role.SHARED]) == "init"


def test_a_non_finite_private_state_is_never_saved(tmp_path: Path) -> None:
    good = {"w": torch.ones(3)}
    _store(tmp_path).save(good)
    for bad in (torch.tensor([1.0, float("nan"), 0.0]), torch.tensor([float("inf"), 0.0, 0.0])):
        with pytest.raises(DivergedError, match="last good state"):
            _store(tmp_path).save({"w": bad})
        loaded, _ = _store(tmp_path).load()
        assert torch.equal(loaded["w"], good["w"])  # the last good state stays on disk
