"""The CUDA path as clients run it (``pytest -m gpu``; skipped without a CUDA device).

CPU-fp32 parity of every method's logits and adapter gradients (fp32 without TF32, and under the
ClientApp's autocast), a train and an evaluate message per method through the ClientApp with amp
on and off, bit-identical results with ``deterministic = true``, and the warm worker on CUDA
releasing its GPU memory when idle.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, RecordDict

from client import warm, work
from common.arrays import from_record, to_record
from common.config import RunConfig
from common.methods import METHODS, method_for
from common.model.roles import Role
from tests.flower_messages import context, instruction
from tests.gpu_parity import check, experts

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_cuda_matches_the_cpu(name: str, amp: bool) -> None:
    result = check(name, CUDA, amp)
    assert result.ok(), result.row()


def _config(run_config: dict[str, Any], name: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {**run_config, "method": name, "state-dir": str(tmp_path / "state" / name), "local-epochs": 1, **extra}


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_a_train_and_an_evaluate_message_on_cuda(run_config: dict[str, Any], tmp_path: Path, name: str, amp: bool) -> None:
    config = _config(run_config, name, tmp_path, amp=amp)
    method = method_for(RunConfig.from_flower(config))
    shared = method.initial_state()[Role.SHARED]
    ctx = context(config, 0)
    kinds = ("train", "evaluate") if method.trains else ("evaluate",)
    for kind in kinds:
        msg = instruction(shared, kind, 1, node_id=ctx.node_id)
        for record, tensors in experts(method).items():  # pFedMoAP's non-local prompts
            msg.content[record] = to_record(tensors)
        reply = work.handle(msg, ctx)
        assert not reply.has_error(), reply.error
        device = reply.content.config_records["device"]
        assert device["type"] == "cuda" and device["peak-memory-mb"] > 0, dict(device)
        assert device["dtype"] == ("fp32" if not amp else ("bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"))
        if kind == "train":
            assert set(reply.content["arrays"]) == set(shared)


def test_deterministic_cuda_training_is_bit_identical(run_config: dict[str, Any], tmp_path: Path) -> None:
    sent = []
    for attempt in range(2):
        config = _config(run_config, "pfedmma", tmp_path / str(attempt), deterministic=True)
        shared = method_for(RunConfig.from_flower(config)).initial_state()[Role.SHARED]
        ctx = context(config, 0)
        reply = work.handle(instruction(shared, "train", 1, node_id=ctx.node_id), ctx)
        sent.append(from_record(reply.content["arrays"]))
    assert all(torch.equal(sent[0][k], sent[1][k]) for k in sent[0])


def test_the_warm_worker_trains_on_cuda_and_releases_its_memory_when_idle(run_config: dict[str, Any], tmp_path: Path) -> None:
    directory = tmp_path / "warm"
    config = {**run_config, "state-dir": str(tmp_path / "state")}
    node = {"partition-id": 0, "num-partitions": 3, "warm-worker-dir": str(directory), "warm-worker-idle": 30,
            "warm-worker-gpu-idle": 3}
    ctx = Context(run_id=5, node_id=100, node_config=node, state=RecordDict(), run_config=config)
    shared = method_for(RunConfig.from_flower(config)).initial_state()[Role.SHARED]
    reply = warm.handle(instruction(shared, "train", 1, node_id=100), ctx)
    assert reply is not None and not reply.has_error()
    assert reply.content.config_records["device"]["type"] == "cuda"
    log = directory / f"{warm.worker_key(ctx)}.log"
    deadline = time.monotonic() + 60
    while "releasing GPU memory" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(1)
    assert "releasing GPU memory" in log.read_text()
    assert (directory / "gpu-holder").is_file()
