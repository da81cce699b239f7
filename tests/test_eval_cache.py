"""Evaluation from the caches (common.data.eval_cache, common.data.image_store): bit-identical
images, each decoded once per process and, on disk, once per node for every later process; byte
budgets for host, GPU and disk; and frozen image features reused only where nothing trains."""

from __future__ import annotations

import gc
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms import transforms as T

from client.trainer import evaluate
from common import transforms
from common.config import RunConfig
from common.data import eval_cache
from common.data.base import ImageSource, LabeledDataset
from common.data.cifar import ArrayImageSource
from common.data.eval_cache import Budget, DecodedImages, RowCache, eval_batches
from common.data.files import FileImageSource
from common.data.image_store import DiskImages
from common.data.shapes import ShapesSource
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


class KeyedSource(CountingSource):
    """A :class:`CountingSource` with a content key, as a file-backed or procedural source has."""

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__(n, seed)
        self.key = f"test:{n}:{seed}"

    def cache_key(self) -> str:
        return self.key


def _pixels(dataset: LabeledDataset, images: DecodedImages) -> torch.Tensor:
    return torch.cat([batch.images for batch in eval_batches(dataset, 3, images)])


def test_the_disk_tier_decodes_once_for_every_later_process(tmp_path: Path) -> None:
    first = KeyedSource(7)
    dataset = LabeledDataset(first, range(7), transforms.test_transform(32, MEAN, STD))
    expected = torch.stack([dataset[i][0] for i in range(7)])
    first.decodes, before = 0, eval_cache.decode_count()
    filled = DecodedImages(Budget(1 << 30), DiskImages(tmp_path / "eval", 1 << 30))
    assert torch.equal(_pixels(dataset, filled), expected)
    assert filled.budget.used_bytes == 0  # what the disk holds is not held twice
    assert first.decodes == 7 and eval_cache.decode_count() - before == 7
    # A new process: its own source object, memory tier and mapping of the file; nothing is decoded,
    # and the memory tier stays empty (the page cache holds the file's rows).
    for _ in range(2):
        later, memory = KeyedSource(7), DecodedImages(Budget(1 << 30), DiskImages(tmp_path / "eval", 1 << 30))
        later.decodes = 0
        again = LabeledDataset(later, range(7), transforms.test_transform(32, MEAN, STD))
        assert torch.equal(_pixels(again, memory), expected)
        assert later.decodes == 0 and memory.budget.used_bytes == 0
    (store,) = (tmp_path / "eval").glob("*.u8")
    assert stat.S_IMODE(os.stat(tmp_path / "eval").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o600
    # Another transform geometry is another file; a source without a key has none.
    list(eval_batches(LabeledDataset(first, range(7), transforms.test_transform(24, MEAN, STD)), 4,
                      DecodedImages(Budget(0), DiskImages(tmp_path / "eval", 1 << 30))))
    list(eval_batches(LabeledDataset(CountingSource(3), range(3), transforms.test_transform(24, MEAN, STD)), 4,
                      DecodedImages(Budget(0), DiskImages(tmp_path / "eval", 1 << 30))))
    assert len(list((tmp_path / "eval").glob("*.u8"))) == 2
    os.chmod(tmp_path / "eval", 0o777)  # a folder others can write to: not used at all
    shared = DiskImages(tmp_path / "eval", 1 << 30)
    assert shared.store_for(KeyedSource(7), transforms.test_transform(32, MEAN, STD)) is None


_SECOND_PROCESS = """
import sys, torch
from common.data import eval_cache
from common.data.eval_cache import Budget, DecodedImages, eval_batches
from common.data.image_store import DiskImages
from common.data.base import LabeledDataset
from common.data.shapes import ShapesSource
from common.transforms import test_transform

def refuse(self, index):
    raise AssertionError("decoded in the second process")

ShapesSource.image = refuse
source = ShapesSource("test", 1, ("solid", "noisy"), seed=3)
dataset = LabeledDataset(source, range(len(source)), test_transform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
images = DecodedImages(Budget(0), DiskImages(sys.argv[1], 1 << 30))
torch.save(torch.cat([b.images for b in eval_batches(dataset, 16, images)]), sys.argv[2])
print(eval_cache.decode_count())
"""


def test_a_second_process_reads_the_file_without_decoding(tmp_path: Path) -> None:
    source = ShapesSource("test", 1, ("solid", "noisy"), seed=3)
    dataset = LabeledDataset(source, range(len(source)), transforms.test_transform(32, (0.5,) * 3, (0.25,) * 3))
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    filled = _pixels(dataset, DecodedImages(Budget(0), DiskImages(tmp_path / "eval", 1 << 30)))
    assert torch.equal(filled, expected)
    out = tmp_path / "second.pt"
    done = subprocess.run(
        [sys.executable, "-c", _SECOND_PROCESS, str(tmp_path / "eval"), str(out)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0"]
    assert torch.equal(torch.load(out), expected)


def test_a_torn_or_missing_row_is_decoded_again(tmp_path: Path) -> None:
    source, transform = KeyedSource(5), transforms.test_transform(32, MEAN, STD)
    dataset = LabeledDataset(source, range(5), transform)
    expected = _pixels(dataset, DecodedImages(Budget(0), DiskImages(tmp_path, 1 << 30)))
    (path,) = tmp_path.glob("*.u8")
    store = DiskImages(tmp_path, 1 << 30).store_for(source, transform)
    assert store is not None
    with open(path, "r+b") as f:  # row 1: a byte that is not what its check says (a write cut short)
        f.seek(store._rows_at + store.row_bytes + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.seek(store._checks_at + 8 * 3)  # row 3: its check never written (a crash before it)
        f.write(b"\0" * 8)
    source.decodes = 0
    memory = DecodedImages(Budget(0), DiskImages(tmp_path, 1 << 30))
    assert torch.equal(_pixels(dataset, memory), expected)
    assert source.decodes == 2
    reread = memory.disk.store_for(source, transform) if memory.disk is not None else None
    assert reread is not None and reread.torn == 1
    source.decodes = 0  # ... and stored again
    assert torch.equal(_pixels(dataset, DecodedImages(Budget(0), DiskImages(tmp_path, 1 << 30))), expected)
    assert source.decodes == 0


def test_processes_filling_one_file_at_once_write_the_same_bytes(tmp_path: Path) -> None:
    source = KeyedSource(6)
    transform = transforms.test_transform(32, MEAN, STD)
    a = DiskImages(tmp_path, 1 << 30).store_for(source, transform)
    b = DiskImages(tmp_path, 1 << 30).store_for(source, transform)
    assert a is not None and b is not None and a.path == b.path
    pixels = [transform.geometry(source.image(i)) for i in range(6)]
    for i in (0, 1, 2, 3):
        assert a.write(i, pixels[i])
    for i in (2, 3, 4, 5):  # b read nothing yet: it rewrites 2 and 3
        assert b.write(i, pixels[i])
    reader = DiskImages(tmp_path, 1 << 30).store_for(source, transform)
    assert reader is not None
    for i in range(6):
        assert torch.equal(reader.read(i), pixels[i])  # type: ignore[arg-type]


def test_a_set_past_the_disk_budget_stays_in_memory_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    one_image = 3 * 32 * 32
    source = KeyedSource(6)
    dataset = LabeledDataset(source, range(6), transforms.test_transform(32, MEAN, STD))
    memory = DecodedImages(Budget(1 << 30), DiskImages(tmp_path, 5 * one_image))  # the file would need 6 + header
    with caplog.at_level(logging.INFO, logger="common.data.image_store"):
        for _ in range(3):
            list(eval_batches(dataset, 4, memory))
    assert source.decodes == 6 and memory.budget.used_bytes == 6 * one_image
    assert not list(tmp_path.glob("*.u8"))
    assert sum("not stored on disk" in r.getMessage() for r in caplog.records) == 1


def test_the_key_of_a_file_source_follows_its_files(tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")

    def build() -> FileImageSource:
        return FileImageSource([f"{i}.png" for i in range(3)], [0, 1, 1], ["a", "b"], root=tmp_path)

    key = build().cache_key()
    assert key is not None and key == build().cache_key()
    assert FileImageSource(["0.png", "1.png"], [0, 1], ["a", "b"], root=tmp_path).cache_key() != key
    os.utime(tmp_path / "1.png", ns=(1, 1))
    assert build().cache_key() != key
    assert FileImageSource(["gone.png"], [0], ["a"], root=tmp_path).cache_key() is None


def test_the_keys_of_procedural_and_array_sources_are_their_parameters_and_pixels() -> None:
    shapes = ShapesSource("test", 2, ("solid",), seed=1)
    assert shapes.cache_key() == ShapesSource("test", 2, ("solid",), seed=1).cache_key()
    others = [ShapesSource("test", 2, ("solid",), seed=2), ShapesSource("val", 2, ("solid",), seed=1),
              ShapesSource("test", 2, ("noisy",), seed=1), ShapesSource("test", 3, ("solid",), seed=1),
              ShapesSource("test", 2, ("solid",), seed=1, size=48)]
    assert len({shapes.cache_key(), *(o.cache_key() for o in others)}) == 6
    data = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    key = ArrayImageSource(data, [0, 1, 0, 1], ["a", "b"]).cache_key()
    assert ArrayImageSource(data.copy(), [1, 1, 1, 1], ["a", "b"]).cache_key() == key  # labels are not pixels
    changed = data.copy()
    changed[2, 7] ^= 1
    assert ArrayImageSource(changed, [0, 1, 0, 1], ["a", "b"]).cache_key() != key


def test_rows_past_the_device_budget_are_kept_on_the_host_then_computed() -> None:
    row_bytes = 5 * 4  # float32 rows of 5
    host, device = Budget(2 * row_bytes), Budget(3 * row_bytes)
    cache = RowCache(host, device, on_device=lambda _: True)  # CPU tensors standing in for a GPU's
    model = nn.Linear(1, 1)
    rows = torch.arange(40, dtype=torch.float32).view(8, 5)
    keys = tuple((0, i) for i in range(8))
    cache.store(model, ("s",), keys[:4], rows[:4])
    cache.store(model, ("s",), keys[4:], rows[4:])
    assert device.used_bytes == 3 * row_bytes and host.used_bytes == 2 * row_bytes
    assert torch.equal(cache.lookup(model, ("s",), keys[:5]), rows[:5])  # type: ignore[arg-type]
    assert cache.lookup(model, ("s",), keys[4:6]) is None  # row 5 fitted nowhere: computed each time
    cache.store(model, ("s",), keys[:2], rows[:2])  # already there: nothing more taken
    assert device.used_bytes == 3 * row_bytes and host.used_bytes == 2 * row_bytes
    plain = RowCache(Budget(1 << 20), Budget(0))  # CPU rows: the host budget, whatever the device's
    plain.store(model, ("s",), keys[:2], rows[:2])
    assert plain.host.used_bytes == 2 * row_bytes and plain.device.used_bytes == 0  # type: ignore[union-attr]
    del model
    gc.collect()  # a rebuilt backbone: the old one's rows and their bytes are given back
    assert device.used_bytes == host.used_bytes == plain.host.used_bytes == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rows_kept_on_the_host_come_back_to_the_gpu() -> None:
    cache = RowCache(Budget(1 << 20), Budget(0))
    model, cuda = nn.Linear(1, 1), torch.device("cuda")
    rows = torch.randn(4, 5, device=cuda)
    keys = tuple((0, i) for i in range(4))
    cache.store(model, ("s",), keys, rows)
    found = cache.lookup(model, ("s",), keys)
    assert found is not None and found.device.type == "cuda" and torch.equal(found, rows)
    assert cache.host.used_bytes == 4 * 5 * 4


def test_set_budgets_takes_the_node_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eval_cache, "_DECODED", DecodedImages(eval_cache._HOST))
    for cache in ("IMAGE_FEATURES", "IMAGE_PREFIX"):
        monkeypatch.setattr(eval_cache, cache, RowCache(eval_cache._HOST, eval_cache._DEVICE))
    for budget in (eval_cache._HOST, eval_cache._DEVICE):
        monkeypatch.setattr(budget, "limit_bytes", budget.limit_bytes)
        monkeypatch.setattr(budget, "used_bytes", 0)
    eval_cache.set_budgets(memory_mb=3, gpu_mb=5, disk_dir=tmp_path / "eval", disk_mb=7)
    assert (eval_cache._HOST.limit_bytes, eval_cache._DEVICE.limit_bytes) == (3 << 20, 5 << 20)
    disk = eval_cache._DECODED.disk
    assert disk is not None and disk.directory == tmp_path / "eval" and disk.limit_bytes == 7 << 20
    eval_cache.set_budgets(memory_mb=3, gpu_mb=5, disk_dir=tmp_path / "eval", disk_mb=9)
    assert eval_cache._DECODED.disk is disk and disk.limit_bytes == 9 << 20  # same stores, new limit
    source = CountingSource(4)
    list(eval_batches(LabeledDataset(source, range(4), transforms.test_transform(32, MEAN, STD)), 4))
    assert eval_cache._HOST.used_bytes == 4 * 3 * 32 * 32  # no key: the memory tier
    eval_cache.set_budgets(memory_mb=0, gpu_mb=5, disk_dir="", disk_mb=9)
    assert eval_cache._DECODED.disk is None and eval_cache._HOST.used_bytes == 0
