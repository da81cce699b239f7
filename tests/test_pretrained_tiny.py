"""The shipped tiny-CLIP checkpoint and the shapes base-to-novel split.

The checkpoint test renders 10 test images per (class, style) of the 24 novel compositions
and classifies them zero-shot; it takes a few seconds on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.data.novel_split import BASE_LABELS, NOVEL_LABELS
from common.data.shapes import COLOURS, SHAPES, STYLES, ShapesSource, class_names
from common.model.clip import build_clip

WEIGHTS = Path(__file__).resolve().parent.parent / "common" / "weights" / "pfedmma-tiny-shapes.safetensors"


def test_split_partitions_labels_and_base_covers_every_attribute() -> None:
    base, novel = BASE_LABELS, NOVEL_LABELS
    assert base == sorted(base) and novel == sorted(novel)
    assert not set(base) & set(novel)
    assert sorted(base + novel) == list(range(len(class_names())))
    assert len(base) == len(novel) == 24
    n_colours = len(COLOURS)
    for labels in (base, novel):
        assert {label // n_colours for label in labels} == set(range(len(SHAPES)))
        assert {label % n_colours for label in labels} == set(range(n_colours))


def test_the_shapes_partition_uses_the_held_out_compositions() -> None:
    from common.data.partition import make_partition
    from common.data.shapes import load_shapes

    sources = load_shapes(train_per_class=2, test_per_class=1)
    partition = make_partition(
        "base-to-novel", sources.train, sources.test, 4, 0, shots=2, beta=0.5, classes_per_client=2,
        base_classes=sources.base_classes,
    )
    assert partition.base_classes == BASE_LABELS and partition.novel_classes == NOVEL_LABELS
    assert sorted(c for client in partition.clients for c in client.classes) == BASE_LABELS


def test_results_json_describes_the_shipped_checkpoint() -> None:
    meta = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert meta["checkpoint"]["sha256"] == hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert meta["checkpoint"]["bytes"] == WEIGHTS.stat().st_size < 16_000_000


@torch.no_grad()
def test_shipped_checkpoint_recognises_novel_compositions_with_a_clip_logit_scale() -> None:
    assert WEIGHTS.is_file(), f"missing {WEIGHTS}; run scripts/pretrain_tiny_clip.py"
    bundle = build_clip("pfedmma-tiny", str(WEIGHTS))
    model = bundle.model
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp16 file, fp32 model
    assert abs(model.logit_scale.exp().item() - 100) < 0.1  # CLIP's trained temperature

    source = ShapesSource("test", per_class=10, styles=STYLES, seed=0)
    keep = np.flatnonzero(np.isin(source.labels, NOVEL_LABELS))
    mean = torch.tensor(bundle.mean).view(3, 1, 1)
    std = torch.tensor(bundle.std).view(3, 1, 1)
    images = torch.stack(
        [
            (torch.from_numpy(np.asarray(source.image(int(i)), dtype=np.float32) / 255).permute(2, 0, 1) - mean) / std
            for i in keep
        ]
    )
    names = class_names()
    prompts = bundle.tokenizer([f"a photo of a {names[c]}." for c in NOVEL_LABELS])
    image_f = F.normalize(model.encode_image(images), dim=-1)
    text_f = F.normalize(model.encode_text(prompts), dim=-1)
    predicted = torch.tensor(NOVEL_LABELS)[(image_f @ text_f.T).argmax(1)]
    accuracy = (predicted == torch.as_tensor(source.labels[keep])).float().mean().item()

    chance = 1 / len(NOVEL_LABELS)
    assert accuracy > 10 * chance, f"zero-shot accuracy on the novel compositions {accuracy:.3f}"
