"""Every method on the tiny CLIP: roles and counts, forward/backward, one training step through
the real ClientApp, and privacy of what it sends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from client.app import app
from client.runtime import pick_device, shared_model
from common.arrays import from_record
from common.config import RunConfig
from common.methods import METHODS, Method, StepInputs, method_for
from common.model.adapters import adapter_parameter_count
from common.model.clip import backbone_parameter_count
from common.model.roles import Role
from tests.flower_messages import context, instruction, wire_bytes
from tests.leaks import leaked_rows

TRAINING = [name for name, cls in METHODS.items() if cls.trains]
WIDTH = 128  # the tiny CLIP's text, image and joint widths


def _config(run_config: dict[str, Any], method: str, tmp_path: Path) -> dict[str, Any]:
    return {**run_config, "method": method, "state-dir": str(tmp_path / "state" / method)}


def _expected_counts(cfg: RunConfig) -> tuple[int, int]:
    """(shared, private) parameter counts from the shapes in docs/paper.md §1 and §5."""
    mma = adapter_parameter_count(WIDTH, WIDTH, cfg.adapter_rank, cfg.adapter_end - cfg.adapter_start + 1)
    towers, cross = mma["text_private"] + mma["image_private"], mma["shared"]
    context_size = cfg.prompt_tokens * WIDTH
    prompts, rank = cfg.fedpgp_prompts, cfg.fedpgp_rank
    gate = 4 * (WIDTH * WIDTH + WIDTH)  # q, k, v, out projections of the 128-wide gate
    return {
        "pfedmma": (cross, towers),
        "local": (0, cross + towers),
        "fedavg-mma": (cross + towers, 0),
        "zeroshot": (0, 0),
        "promptfl": (context_size, 0),
        "fedpgp": (prompts * context_size, prompts * (cfg.prompt_tokens * rank + rank * WIDTH)),
        "pfedmoap": (context_size, gate),
    }[cfg.method]


def _experts(method: Method, count: int = 2) -> ArrayRecord:
    """Non-local prompts for pFedMoAP (perturbed copies of the initial one), else nothing."""
    shared = method.initial_state()[Role.SHARED]
    (prompt,) = shared.values()
    return ArrayRecord({f"client-{9 + i}": prompt + 0.05 * (i + 1) for i in range(count)})


def _train_message(method: Method, node_id: int, server_round: int = 1) -> Message:
    msg = instruction(method.initial_state()[Role.SHARED], "train", server_round, node_id)
    if method.extra_records:
        msg.content["experts"] = _experts(method)
    return msg


def test_registry_names_match_classes() -> None:
    assert list(METHODS) == ["pfedmma", "zeroshot", "local", "fedavg-mma", "promptfl", "fedpgp", "pfedmoap"]
    assert all(cls.name == name for name, cls in METHODS.items())


@pytest.mark.parametrize("name", list(METHODS))
def test_roles_and_counts(run_config: dict[str, Any], tmp_path: Path, name: str) -> None:
    cfg = RunConfig.from_flower(_config(run_config, name, tmp_path))
    method = method_for(cfg)
    model = shared_model(cfg, pick_device()).model
    counts = method.roles.counts(model)
    assert (counts[Role.SHARED], counts[Role.PRIVATE]) == _expected_counts(cfg)
    assert counts[Role.FROZEN] == backbone_parameter_count(cfg.model_name)  # the whole CLIP, logit scale too
    roles = method.roles.of(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, r in roles.items() if r is not Role.FROZEN}
    # The server's view (no backbone) names the same tensors as the client's model.
    initial = method.initial_state()
    for role in (Role.SHARED, Role.PRIVATE):
        assert set(initial[role]) == {n for n, r in roles.items() if r is role}


@pytest.mark.parametrize("name", list(METHODS))
def test_forward_backward_shapes(run_config: dict[str, Any], tmp_path: Path, name: str) -> None:
    cfg = RunConfig.from_flower(_config(run_config, name, tmp_path))
    method = method_for(cfg)
    device = pick_device()  # a GPU where there is one: the test runs as clients run
    bundle = shared_model(cfg, device)
    model = bundle.model
    extras = {"experts": {k: v.to(device) for k, v in from_record(_experts(method)).items()}} if method.extra_records else {}
    inputs = StepInputs(extras, torch.Generator().manual_seed(0))
    classifier = method.classifier(model, bundle.tokenizer, ["red circle", "blue square", "green ring"], device, inputs)
    images, labels = torch.randn(4, 3, 32, 32).to(device), torch.tensor([0, 1, 2, 0]).to(device)
    assert classifier.logits(images).shape == (4, 3)
    classes = classifier.class_features()
    assert classifier.logits(images, classes).shape == (4, 3)
    model.zero_grad(set_to_none=True)
    classifier.set_training(True)
    loss, logits = classifier.loss(images, labels)
    classifier.set_training(False)
    assert loss.shape == () and torch.isfinite(loss) and logits.shape == (4, 3)
    if not method.trains:
        assert not loss.requires_grad  # nothing to train
        return
    loss.backward()
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.shape == param.shape, param_name
            assert param.grad.abs().sum() > 0, f"{param_name} got a zero gradient"
        else:
            assert param.grad is None, f"frozen {param_name} got a gradient"


@pytest.mark.parametrize("name", TRAINING)
def test_one_step_changes_exactly_the_trainable_tensors(run_config: dict[str, Any], tmp_path: Path, name: str) -> None:
    config = {**_config(run_config, name, tmp_path), "local-epochs": 1}
    cfg = RunConfig.from_flower(config)
    method = method_for(cfg)
    model = shared_model(cfg, pick_device()).model
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    initial = method.initial_state()

    ctx = context(config, 0)
    reply = app(_train_message(method, ctx.node_id), ctx)
    assert not reply.has_error(), reply.error

    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen_before.items()), "a frozen tensor changed"
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    for role in (Role.SHARED, Role.PRIVATE):
        for tensor_name, start in initial[role].items():
            assert not torch.equal(after[tensor_name].detach().cpu(), start), f"{role.value} {tensor_name} did not move"
    sent = from_record(reply.content["arrays"])
    assert set(sent) == set(initial[Role.SHARED])
    assert all(torch.equal(sent[k], after[k].detach().cpu()) for k in sent)  # the upload is the trained state


@pytest.mark.parametrize("name", TRAINING)
def test_reply_carries_only_the_shared_tensors(run_config: dict[str, Any], tmp_path: Path, name: str) -> None:
    config = _config(run_config, name, tmp_path)
    cfg = RunConfig.from_flower(config)
    method = method_for(cfg)
    model = shared_model(cfg, pick_device()).model
    ctx = context(config, 1)
    reply = app(_train_message(method, ctx.node_id), ctx)
    assert not reply.has_error(), reply.error
    assert list(reply.content.array_records) == ["arrays"] and list(reply.content.config_records) == ["device"]
    device = reply.content.config_records["device"]  # where it ran: text and numbers, no tensor
    assert device["type"] == pick_device().type and device["dtype"] in ("fp32", "bf16", "fp16")
    assert set(reply.content["arrays"]) == set(method.initial_state()[Role.SHARED])
    assert set(reply.content.metric_records["metrics"]) == {
        "num-examples", "train-loss", "train-accuracy", "partition-id", "num-partitions", "private-source", "skipped-images"
    }
    blob = wire_bytes(reply)
    private = method.roles.state(model, Role.PRIVATE)  # the values just trained and stored
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    assert leaked_rows(blob, private) == []
    assert leaked_rows(blob, frozen) == []
    shared = method.roles.state(model, Role.SHARED)
    assert set(leaked_rows(blob, shared)) == {n for n, t in shared.items() if t.numel() > 1}  # positive control
    # What the ClientApp process hands back to its SuperNode besides the reply: its context.
    # The private tensors live on the node's disk only, never in context.state.
    assert not ctx.state.array_records
    assert leaked_rows(b"".join(o.deflate() for o in get_all_nested_objects(ctx.state).values()), private) == []

    evaluation = app(instruction(method.initial_state()[Role.SHARED], "evaluate", 1, ctx.node_id), ctx)
    assert not evaluation.content.array_records  # evaluation replies carry metrics only
    assert leaked_rows(wire_bytes(evaluation), {**private, **shared, **frozen}) == []


def test_zeroshot_refuses_to_train(run_config: dict[str, Any], tmp_path: Path) -> None:
    config = _config(run_config, "zeroshot", tmp_path)
    method = method_for(RunConfig.from_flower(config))
    ctx = context(config, 0)
    with pytest.raises(ValueError, match="trains nothing"):
        app(_train_message(method, ctx.node_id), ctx)
    reply = app(instruction({}, "evaluate", 1, ctx.node_id), ctx)
    assert {"local-accuracy", "base-accuracy", "novel-accuracy"} <= set(reply.content.metric_records["metrics"])


def test_unexpected_records_are_refused(run_config: dict[str, Any], tmp_path: Path) -> None:
    config = _config(run_config, "pfedmma", tmp_path)
    method = method_for(RunConfig.from_flower(config))
    ctx = context(config, 0)
    msg = _train_message(method, ctx.node_id)
    msg.content["experts"] = ArrayRecord()
    with pytest.raises(ValueError, match=r"takes records \[\] besides 'arrays'; the message also has \['experts'\]"):
        app(msg, ctx)
