"""The text tower's exact shortcuts (common.model.text): EOT truncation and the frozen-prefix
cache give the reference path's features and gradients within fp32 rounding, and only apply
where they are exact."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from common.config import RunConfig
from common.methods import StepInputs, method_for
from common.model.clip import build_clip
from common.model.prompts import ContextTemplate
from common.model.text import TextTower, needed_length, reference_path

NAMES = ["red circle", "blue_square", "white ring", "green triangle with a long name"]


def _classifiers(run_config: dict[str, Any], method: str, **overrides: Any):
    cfg = RunConfig.from_flower({**run_config, "method": method, "pretrained": "", **overrides})
    m = method_for(cfg)
    bundle = build_clip(cfg.model_name, cfg.pretrained, init_seed=3)
    m.attach(bundle.model)
    fast = m.classifier(bundle.model, bundle.tokenizer, NAMES, "cpu", StepInputs())
    with reference_path():
        reference = m.classifier(bundle.model, bundle.tokenizer, NAMES, "cpu", StepInputs())
    return m, bundle, fast, reference


def test_pfedmma_text_features_and_gradients_match_the_reference_path(run_config: dict[str, Any]) -> None:
    _, bundle, fast, reference = _classifiers(run_config, "pfedmma", **{"adapter-start": 2, "adapter-end": 4})
    assert reference.tower.length == 16 and reference.tower.prefix_blocks == 0
    longest = int(fast.tokens.argmax(dim=-1).max())
    assert fast.tower.length == longest + 1 < 16  # cut right after the longest prompt's EOT
    assert fast.tower.prefix_blocks == 1  # block 1 is before adapter-start = 2
    with torch.no_grad():
        torch.testing.assert_close(reference.class_features(), torch.nn.functional.normalize(
            bundle.model.encode_text(reference.tokens), dim=-1), rtol=0, atol=0)
        torch.testing.assert_close(fast.class_features(), reference.class_features(), rtol=0, atol=1e-5)
    images, labels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2, 3])
    grads = []
    for classifier in (fast, reference):
        bundle.model.zero_grad(set_to_none=True)
        classifier.loss(images, labels)[0].backward()
        grads.append({n: p.grad.clone() for n, p in bundle.model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and any(".text." in n for n in grads[0])  # text adapters get gradients
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_the_frozen_prefix_runs_once_per_tower(run_config: dict[str, Any]) -> None:
    _, bundle, fast, reference = _classifiers(run_config, "pfedmma", **{"adapter-start": 3, "adapter-end": 4})
    calls = []
    hooks = [b.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, b in enumerate(bundle.model.transformer.resblocks)]
    for _ in range(3):
        fast.class_features()
    assert calls.count(0) == calls.count(1) == 1 and calls.count(2) == calls.count(3) == 3
    calls.clear()
    for _ in range(3):
        reference.class_features()
    assert all(calls.count(i) == 3 for i in range(4))
    for hook in hooks:
        hook.remove()


def test_zeroshot_caches_the_whole_frozen_text_tower(run_config: dict[str, Any]) -> None:
    _, bundle, fast, reference = _classifiers(run_config, "zeroshot")
    assert fast.tower.prefix_blocks == len(bundle.model.transformer.resblocks)
    with torch.no_grad():
        torch.testing.assert_close(fast.class_features(), reference.class_features(), rtol=0, atol=1e-5)


def test_a_trainable_block_ends_the_cached_prefix() -> None:
    model = build_clip("pfedmma-tiny", "", init_seed=1).model
    tokens = torch.tensor([[49406, 320, 1125, 49407] + [0] * 12])
    model.transformer.resblocks[1].mlp.c_fc.weight.requires_grad_(True)
    assert TextTower(model, tokens).prefix_blocks == 1


def test_no_truncation_without_a_causal_mask() -> None:
    model = build_clip("pfedmma-tiny", "", init_seed=1).model
    tokens = torch.tensor([[49406, 320, 1125, 49407] + [0] * 12])
    assert needed_length(model, tokens) == 4
    model.attn_mask = torch.zeros(16, 16)  # bidirectional: padding would reach the EOT feature
    assert needed_length(model, tokens) == 16
    model.attn_mask = None
    assert needed_length(model, tokens) == 16


@pytest.mark.parametrize("prompts", [1, 3])
def test_learned_context_features_match_the_reference_path(prompts: int) -> None:
    bundle = build_clip("pfedmma-tiny", "", init_seed=2)
    fast = ContextTemplate(bundle.model, bundle.tokenizer, NAMES, 4, "cpu")
    with reference_path():
        reference = ContextTemplate(bundle.model, bundle.tokenizer, NAMES, 4, "cpu")
    ctx = torch.randn(prompts, 4, bundle.model.transformer.width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = fast.encode(bundle.model, ctx), reference.encode(bundle.model, ctx)
    assert got.shape == want.shape == (prompts, len(NAMES), bundle.model.text_projection.shape[1])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
