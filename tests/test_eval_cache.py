"""Evaluation from the process's caches (common.data.eval_cache): bit-identical images, each
decoded once, a byte budget, and frozen image features reused only where nothing trains."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms import transforms as T

from client.trainer import evaluate
from common import transforms
from common.config import RunConfig
from common.data import eval_cache
from common.data.base import ImageSource, LabeledDataset
from common.data.eval_cache import Budget, DecodedImages, RowCache, eval_batches
from common.methods import StepInputs, method_for
from common.model.clip import build_clip
from common.model.image import features_from_prefix, frozen_prefix_blocks, prefix_state

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


class CountingSource(ImageSource):
    """Random RGB images of odd sizes, counting decodes."""

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.pixels = [rng.integers(0, 256, (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3), dtype=np.uint8) for _ in range(n)]
        self.labels = rng.integers(0, 3, n)
        self.class_names = ["red circle", "blue square", "white ring"]
        self.decodes = 0

    def image(self, index: int) -> Image.Image:
        self.decodes += 1
        return Image.fromarray(self.pixels[index])


def test_the_split_test_transform_is_torchvisions_bit_for_bit() -> None:
    compose = T.Compose([T.Resize(32, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)])
    ours, source = transforms.test_transform(32, MEAN, STD), CountingSource(5)
    for i in range(5):
        assert torch.equal(ours(source.image(i)), compose(source.image(i)))
        pixels = ours.geometry(source.image(i))
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)


def test_batches_equal_the_datasets_items_and_decode_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eval_cache, "_DECODED", DecodedImages(Budget(1 << 30)))
    source = CountingSource(7)
    base = LabeledDataset(source, range(7), transforms.test_transform(32, MEAN, STD), {0: 0, 1: 1, 2: 2})
    local = LabeledDataset(source, [5, 1], transforms.test_transform(32, MEAN, STD), {0: 0, 1: 1, 2: 2})  # another client's view
    expected = [base[i] for i in range(7)]
    source.decodes = 0
    for _ in range(3):
        batches = list(eval_batches(base, batch_size=3))
        assert [len(b.labels) for b in batches] == [3, 3, 1]
        assert torch.equal(torch.cat([b.images for b in batches]), torch.stack([x for x, _ in expected]))
        assert torch.cat([b.labels for b in batches]).tolist() == [y for _, y in expected]
    (batch,) = eval_batches(local, batch_size=8)  # same (source, index): no new decode
    assert torch.equal(batch.images, torch.stack([expected[5][0], expected[1][0]]))
    assert source.decodes == 7


def test_past_the_budget_images_are_decoded_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    one_image = 3 * 32 * 32
    monkeypatch.setattr(eval_cache, "_DECODED", DecodedImages(Budget(2 * one_image)))
    source = CountingSource(4)
    dataset = LabeledDataset(source, range(4), transforms.test_transform(32, MEAN, STD))
    list(eval_batches(dataset, 4))
    list(eval_batches(dataset, 4))
    assert source.decodes == 4 + 2 and eval_cache._DECODED.budget.used_bytes == 2 * one_image


@pytest.mark.parametrize(("name", "image_fixed"), [("pfedmma", False), ("promptfl", True), ("zeroshot", True)])
def test_evaluation_from_the_caches_equals_the_dataloader_path(
    run_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch, name: str, image_fixed: bool
) -> None:
    monkeypatch.setattr(eval_cache, "_DECODED", DecodedImages(Budget(1 << 30)))
    for cache in ("IMAGE_FEATURES", "IMAGE_PREFIX"):
        monkeypatch.setattr(f"client.trainer.{cache}", RowCache(Budget(1 << 30)))
    cfg = RunConfig.from_flower({**run_config, "method": name})
    method = method_for(cfg)
    bundle = build_clip(cfg.model_name, cfg.pretrained, init_seed=cfg.seed)
    method.attach(bundle.model)
    source = CountingSource(10, seed=1)
    dataset = LabeledDataset(source, range(10), transforms.test_transform(bundle.image_size, bundle.mean, bundle.std))
    classifier = method.classifier(bundle.model, bundle.tokenizer, source.class_names, "cpu", StepInputs())
    assert classifier.image_tower_fixed() is image_fixed
    blocks = bundle.model.visual.transformer.resblocks
    calls: list[str] = []
    hooks = [blocks[0].register_forward_hook(lambda *_: calls.append("first")),
             blocks[-1].register_forward_hook(lambda *_: calls.append("last"))]
    cpu = torch.device("cpu")
    plain = evaluate(classifier, DataLoader(dataset, batch_size=4), cpu)
    calls.clear()
    cached = [evaluate(classifier, eval_batches(dataset, 4), cpu) for _ in range(2)]
    for hook in hooks:
        hook.remove()
    for result in cached:
        assert torch.equal(result.hits, plain.hits) and result.num_examples == 10
        assert result.loss == pytest.approx(plain.loss, rel=1e-6)
    # Over two evaluations of 3 batches: a fixed image tower runs once per image; an adapted one
    # (blocks 2..4) reuses the frozen block 1's output and runs its adapted blocks every time.
    assert calls.count("first") == 3
    assert calls.count("last") == (3 if image_fixed else 6)


def test_the_split_image_tower_is_encode_image(run_config: dict[str, Any]) -> None:
    cfg = RunConfig.from_flower({**run_config, "method": "pfedmma", "adapter-start": 3})
    bundle = build_clip(cfg.model_name, cfg.pretrained, init_seed=cfg.seed)
    method_for(cfg).attach(bundle.model)
    assert frozen_prefix_blocks(bundle.model) == 2
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        split = features_from_prefix(bundle.model, prefix_state(bundle.model, images, 2), 2)
        torch.testing.assert_close(split, bundle.model.encode_image(images), rtol=0, atol=0)
    bundle.model.visual.conv1.weight.requires_grad_(True)  # a trainable patch embedding: nothing to reuse
    assert frozen_prefix_blocks(bundle.model) == 0


def test_an_evaluation_message_computes_text_features_once_per_class_list(
    run_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.app import app
    from common.methods.classifiers import HandcraftedPromptClassifier
    from common.model.roles import Role
    from tests.flower_messages import context, instruction

    computed: list[int] = []
    original = HandcraftedPromptClassifier.class_features

    def counted(self: HandcraftedPromptClassifier) -> torch.Tensor:
        computed.append(len(self.class_names))
        return original(self)

    monkeypatch.setattr(HandcraftedPromptClassifier, "class_features", counted)
    cfg = RunConfig.from_flower(run_config)
    shared = method_for(cfg).initial_state()[Role.SHARED]
    ctx = context(run_config, 0)
    reply = app(instruction(shared, "evaluate", 1, ctx.node_id), ctx)
    metrics = reply.content.metric_records["metrics"]
    assert {"local-accuracy", "base-accuracy", "novel-accuracy"} <= set(metrics)
    # Local and Base share the base classes; Novel has its own: two computations, not three.
    assert len(computed) == 2
