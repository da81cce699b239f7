"""The learned-prompt text path: exact against open_clip's encode_text, and its errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from common.config import RunConfig
from common.methods import StepInputs, method_for
from common.model.clip import build_clip
from common.model.prompts import ContextTemplate
from common.model.text import reference_path

NAMES = ["red circle", "blue_square", "white ring"]


def test_context_path_with_the_x_embeddings_is_encode_text() -> None:
    bundle = build_clip("pfedmma-tiny", "", init_seed=3)
    model, tokenizer = bundle.model, bundle.tokenizer
    with reference_path():  # all 16 positions, LayerNorm before pooling: open_clip's arithmetic
        reference = ContextTemplate(model, tokenizer, NAMES, 4, "cpu")
    template = ContextTemplate(model, tokenizer, NAMES, 4, "cpu")
    assert reference.tower.length == 16 and template.tower.length == 9  # SOS, 4 X, "white ring", ".", EOT
    x_embeddings = template.embedding[0, 1:5]  # what the four "X" tokens embed to
    with torch.no_grad():
        direct = model.encode_text(tokenizer([f"X X X X {n.replace('_', ' ')}." for n in NAMES]))
        torch.testing.assert_close(reference.encode(model, x_embeddings.unsqueeze(0))[0], direct, rtol=0, atol=0)
        # Truncated at the longest EOT: equal within fp32 rounding (shorter sums in the attention).
        torch.testing.assert_close(template.encode(model, x_embeddings.unsqueeze(0))[0], direct, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["promptfl", "fedpgp", "pfedmoap"])
def test_zero_context_gives_the_logits_of_the_prompt_text(run_config: dict[str, Any], tmp_path: Path, name: str) -> None:
    # With every context tensor at zero (PromptFL's context; FedPGP's sigma, U and V), the
    # classifier equals plain CLIP on the text "X ... X {class}." whose "X" embeds to zero.
    cfg = RunConfig.from_flower({**run_config, "method": name})
    method = method_for(cfg)
    bundle = build_clip(cfg.model_name, cfg.pretrained, init_seed=cfg.seed)
    reference = copy.deepcopy(bundle.model)
    method.attach(bundle.model)
    with torch.no_grad():
        for param in method.roles.parameters(bundle.model, *method.roles.table.values()).values():
            if param.dim() == 3:  # context vectors and U, V; not the pFedMoAP gate
                param.zero_()
        (x_id,) = bundle.tokenizer.encode("X")
        reference.token_embedding.weight[x_id] = 0.0
    classifier = method.classifier(bundle.model, bundle.tokenizer, NAMES, "cpu", StepInputs())
    images = torch.randn(5, 3, 32, 32)
    texts = [" ".join(["X"] * cfg.prompt_tokens) + f" {n.replace('_', ' ')}." for n in NAMES]
    with torch.no_grad():
        logits = classifier.logits(images)
        text = F.normalize(reference.encode_text(bundle.tokenizer(texts)), dim=-1)
        image = F.normalize(reference.encode_image(images), dim=-1)
        expected = reference.logit_scale.exp() * image @ text.T
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_a_prompt_longer_than_the_text_tower_is_refused() -> None:
    bundle = build_clip("pfedmma-tiny", "")  # reads 16 tokens
    with pytest.raises(ValueError, match=r"prompt-tokens=14: the prompt .* needs 19 tokens.*at most 16; lower prompt-tokens to at most 11"):
        ContextTemplate(bundle.model, bundle.tokenizer, NAMES, 14, "cpu")
