"""The shipped tiny-CLIP checkpoint and the pretraining split it was trained on.

The checkpoint test renders 10 test images per (class, style) of the 24 held-out
compositions and classifies them zero-shot; it takes a few seconds on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.data.novel_split import PRETRAIN_BASE_LABELS, PRETRAIN_NOVEL_LABELS
from common.data.shapes import COLOURS, SHAPES, STYLES, ShapesSource, class_names
from common.model.clip import build_clip

WEIGHTS = Path(__file__).resolve().parent.parent / "common" / "weights" / "pfedmma-tiny-shapes.safetensors"


def test_split_partitions_labels_and_base_covers_every_attribute() -> None:
    base, novel = PRETRAIN_BASE_LABELS, PRETRAIN_NOVEL_LABELS
    assert base == sorted(base) and novel == sorted(novel)
    assert not set(base) & set(novel)
    assert sorted(base + novel) == list(range(len(class_names())))
    assert len(base) == len(novel) == 24
    n_colours = len(COLOURS)
    for labels in (base, novel):
        assert {label // n_colours for label in labels} == set(range(len(SHAPES)))
        assert {label % n_colours for label in labels} == set(range(n_colours))


def test_split_cuts_across_the_federated_base_to_novel_split() -> None:
    # As documented in novel_split: each federated half (labels < 24, >= 24) holds 12 + 12.
    federated_novel = set(range(24, 48))
    assert len(federated_novel & set(PRETRAIN_BASE_LABELS)) == 12
    assert len(federated_novel & set(PRETRAIN_NOVEL_LABELS)) == 12


def test_results_json_describes_the_shipped_checkpoint() -> None:
    meta = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert meta["checkpoint"]["sha256"] == hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert meta["checkpoint"]["bytes"] == WEIGHTS.stat().st_size < 16_000_000


@torch.no_grad()
def test_shipped_checkpoint_recognises_held_out_compositions() -> None:
    assert WEIGHTS.is_file(), f"missing {WEIGHTS}; run scripts/pretrain_tiny_clip.py"
    bundle = build_clip("pfedmma-tiny", str(WEIGHTS))
    model = bundle.model
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp16 file, fp32 model

    source = ShapesSource("test", per_class=10, styles=STYLES, seed=0)
    keep = np.flatnonzero(np.isin(source.labels, PRETRAIN_NOVEL_LABELS))
    mean = torch.tensor(bundle.mean).view(3, 1, 1)
    std = torch.tensor(bundle.std).view(3, 1, 1)
    images = torch.stack(
        [
            (torch.from_numpy(np.asarray(source.image(int(i)), dtype=np.float32) / 255).permute(2, 0, 1) - mean) / std
            for i in keep
        ]
    )
    names = class_names()
    prompts = bundle.tokenizer([f"a photo of a {names[c]}." for c in PRETRAIN_NOVEL_LABELS])
    image_f = F.normalize(model.encode_image(images), dim=-1)
    text_f = F.normalize(model.encode_text(prompts), dim=-1)
    predicted = torch.tensor(PRETRAIN_NOVEL_LABELS)[(image_f @ text_f.T).argmax(1)]
    accuracy = (predicted == torch.as_tensor(source.labels[keep])).float().mean().item()

    chance = 1 / len(PRETRAIN_NOVEL_LABELS)
    assert accuracy > 3 * chance, f"zero-shot accuracy on held-out compositions {accuracy:.3f}"
