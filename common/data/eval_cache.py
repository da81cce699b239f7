"""Evaluation images decoded once per node, and image features computed once per frozen tower.

Every client evaluates every round, and in the base-to-novel protocol every client of a node
evaluates the same Base and Novel test sets. Decoding and resizing those images again each time
was most of an evaluation's cost. A test image is decoded, resized and centre-cropped once and
kept as uint8, a quarter of its float size; the float conversion and normalisation run per batch,
with the same arithmetic as the per-image transform, so the tensors are bit-identical (a test
checks this). Decoded images live in two tiers, looked up in this order:

* in this process's memory, within ``eval-cache-mb``: only for images the disk tier does not
  hold, since the page cache already keeps a mapped file's rows in memory, once for every process
  of the node, and the budget is worth more to the rows below;
* on the node's disk (``common.data.image_store``), within ``eval-disk-cache-mb`` in
  ``eval-cache-dir``, for sources with a stable content key: decoded by the first process that
  needs an image, memory-mapped by every later process and round.

What the image tower computes from a test image is reused where it cannot change: the whole
feature when nothing in the image tower trains (prompt methods, zero-shot), and otherwise the
hidden state after the frozen blocks before the first adapter (``common.model.image``). These rows
are keyed weakly by the model object, so a rebuilt backbone starts afresh (and gives its bytes
back). Rows computed on a GPU stay there within ``eval-cache-gpu-mb``; past that they are kept on
the host (pinned, copied to the GPU per batch) within ``eval-cache-mb``, shared with the in-memory
images; past both, they are computed each time. Nothing here is client-specific: the key is
(source, index), and a client's own adapters only ever act on what comes after the cached part.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.data.base import ImageSource, LabeledDataset
from common.data.image_store import DiskImages
from common.transforms import TestTransform

log = logging.getLogger(__name__)

DEFAULT_BUDGET_MB = 2048
DEFAULT_GPU_BUDGET_MB = 1024


@dataclass(frozen=True)
class EvalBatch:
    images: torch.Tensor  # normalised, as the test transform gives them
    labels: torch.Tensor
    keys: tuple[tuple[int, int], ...]  # (source id, index) per image: what a feature cache keys on


class Budget:
    """Bytes the process's evaluation caches may hold together in one kind of memory."""

    def __init__(self, limit_bytes: int, name: str = "evaluation caches", past: str = "computed every time") -> None:
        self.limit_bytes, self.used_bytes = limit_bytes, 0
        self.name, self.past = name, past
        self.full_logged = False

    def take(self, nbytes: int) -> bool:
        if self.used_bytes + nbytes > self.limit_bytes:
            if not self.full_logged:
                self.full_logged = True
                log.info("%s full (%d MB): further items are %s", self.name, self.used_bytes >> 20, self.past)
            return False
        self.used_bytes += nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        self.used_bytes = max(0, self.used_bytes - nbytes)


_HOST = Budget(DEFAULT_BUDGET_MB << 20, "host evaluation caches (eval-cache-mb)")
_DEVICE = Budget(DEFAULT_GPU_BUDGET_MB << 20, "GPU evaluation caches (eval-cache-gpu-mb)", "kept on the host")


class DecodedImages:
    """uint8 test images per (source, index, transform geometry): from ``disk`` when it holds the
    source, else in memory within ``budget``."""

    decodes = 0  # images this process has decoded for evaluation, over every instance (decode_count)

    def __init__(self, budget: Budget, disk: DiskImages | None = None) -> None:
        self.budget, self.disk = budget, disk
        self._images: dict[tuple, torch.Tensor] = {}
        self._bytes = 0

    def image(self, source: ImageSource, index: int, transform: TestTransform) -> torch.Tensor:
        key = (id(source), index, transform.geometry_key)
        cached = self._images.get(key)
        if cached is not None:
            return cached
        store = self.disk.store_for(source, transform) if self.disk is not None else None
        if store is not None:
            stored = store.read(index)
            if stored is not None:
                return stored
        decoded = transform.geometry(source.image(index))
        DecodedImages.decodes += 1
        if store is not None and store.write(index, decoded):
            return decoded
        nbytes = decoded.numel() * decoded.element_size()
        if self.budget.take(nbytes):
            self._images[key] = decoded
            self._bytes += nbytes
        return decoded

    def clear(self) -> None:
        self._images.clear()
        self.budget.give_back(self._bytes)
        self._bytes = 0


def _on_accelerator(device: torch.device) -> bool:
    return device.type != "cpu"


@dataclass
class _Rows:
    """One model's rows: (setting, key) -> (row, the device a lookup returns it on)."""

    rows: dict[tuple, tuple[torch.Tensor, torch.device]] = field(default_factory=dict)
    host_bytes: int = 0
    device_bytes: int = 0


class RowCache:
    """One tensor row per (model, setting, source id, index): an image's frozen image-tower
    feature, or its hidden state after the frozen blocks. Keyed weakly by the model, so a
    rebuilt backbone never reads another's rows.

    A row computed on an accelerator (``on_device`` of its device) stays there within ``device``;
    past it (or with no ``device`` budget) it is kept on the host within ``host``, pinned when the
    device is CUDA, and copied back per batch. Rows computed on the CPU count against ``host``.
    """

    def __init__(
        self,
        host: Budget,
        device: Budget | None = None,
        on_device: Callable[[torch.device], bool] = _on_accelerator,
    ) -> None:
        self.host, self.device, self.on_device = host, device, on_device
        self._by_model: weakref.WeakKeyDictionary[nn.Module, _Rows] = weakref.WeakKeyDictionary()

    def lookup(self, model: nn.Module, setting: tuple, keys: tuple[tuple[int, int], ...]) -> torch.Tensor | None:
        table = self._by_model.get(model)
        if table is None:
            return None
        found = [table.rows.get((setting, key)) for key in keys]
        if any(entry is None for entry in found):
            return None
        entries: list[tuple[torch.Tensor, torch.device]] = found  # type: ignore[assignment]
        home = entries[0][1]
        away = [i for i, (row, _) in enumerate(entries) if row.device != home]
        rows = [row for row, _ in entries]
        if away:  # host-kept rows of a device's batch: one copy to the device for all of them
            staged = torch.empty(
                (len(away), *rows[away[0]].shape), dtype=rows[away[0]].dtype, pin_memory=home.type == "cuda"
            )
            torch.stack([rows[i] for i in away], out=staged)
            moved = staged.to(home, non_blocking=True)
            for j, i in enumerate(away):
                rows[i] = moved[j]
        return torch.stack(rows)

    def store(self, model: nn.Module, setting: tuple, keys: tuple[tuple[int, int], ...], rows: torch.Tensor) -> None:
        table = self._table(model)
        rows, home = rows.detach(), rows.device
        row_bytes = rows[0].numel() * rows.element_size() if len(rows) else 0
        device = self.device if self.device is not None and self.on_device(home) else None
        keep_device, keep_host = [], []
        for i, key in enumerate(keys):
            if (setting, key) in table.rows:
                continue
            if device is not None and device.take(row_bytes):
                keep_device.append(i)
                table.device_bytes += row_bytes
            elif self.host.take(row_bytes):
                keep_host.append(i)
                table.host_bytes += row_bytes
        if keep_device:
            block = rows[keep_device]  # a copy: the batch's own tensor is not held
            for j, i in enumerate(keep_device):
                table.rows[(setting, keys[i])] = (block[j], home)
        if keep_host:
            pinned = torch.empty((len(keep_host), *rows.shape[1:]), dtype=rows.dtype, pin_memory=home.type == "cuda")
            pinned.copy_(rows[keep_host])
            for j, i in enumerate(keep_host):
                table.rows[(setting, keys[i])] = (pinned[j], home)

    def clear(self) -> None:
        for table in list(self._by_model.values()):
            self._release(table)
        self._by_model = weakref.WeakKeyDictionary()

    def _table(self, model: nn.Module) -> _Rows:
        table = self._by_model.get(model)
        if table is None:
            table = self._by_model[model] = _Rows()
            # When the model goes, its rows go with the dictionary entry; their bytes come back here.
            weakref.finalize(model, self._release, table)
        return table

    def _release(self, table: _Rows) -> None:
        self.host.give_back(table.host_bytes)
        if self.device is not None:
            self.device.give_back(table.device_bytes)
        table.rows.clear()
        table.host_bytes = table.device_bytes = 0


_DECODED = DecodedImages(_HOST)
IMAGE_FEATURES = RowCache(_HOST, _DEVICE)  # image towers nothing trains (prompt methods, zero-shot)
IMAGE_PREFIX = RowCache(_HOST, _DEVICE)  # hidden states after the frozen blocks (adapter methods)
# Every source a key names is held here, so that its id stays its own for the process's life
# (sources are few and already cached by common.data.federated).
_SOURCES: dict[int, ImageSource] = {}


def decode_count() -> int:
    """Test images this process has decoded for evaluation so far (0 more once every tier holds them)."""
    return DecodedImages.decodes


def _set_limit(budget: Budget, megabytes: int) -> None:
    if budget.limit_bytes != megabytes << 20:
        budget.limit_bytes, budget.full_logged = megabytes << 20, False
        if budget.used_bytes > budget.limit_bytes:
            for cache in (_DECODED, IMAGE_FEATURES, IMAGE_PREFIX):
                cache.clear()


def set_budgets(memory_mb: int, gpu_mb: int, disk_dir: str | Path, disk_mb: int) -> None:
    """The node's evaluation-cache settings for this process: ``eval-cache-mb`` (host memory),
    ``eval-cache-gpu-mb`` (GPU memory), ``eval-cache-dir`` and ``eval-disk-cache-mb`` (the disk
    tier; an empty directory or 0 MB turns it off). Cheap to call every message; caches that a
    lower limit no longer covers are emptied."""
    _set_limit(_HOST, memory_mb)
    _set_limit(_DEVICE, gpu_mb)
    disk = _DECODED.disk
    wanted = Path(disk_dir).expanduser() if str(disk_dir) and disk_mb > 0 else None
    if wanted is None:
        _DECODED.disk = None
    elif disk is None or disk.directory != wanted:
        _DECODED.disk = DiskImages(wanted, disk_mb << 20)
    else:
        disk.limit_bytes = disk_mb << 20


def cacheable(dataset: object) -> bool:
    return isinstance(dataset, LabeledDataset) and isinstance(dataset.transform, TestTransform)


def eval_batches(dataset: LabeledDataset, batch_size: int, images: DecodedImages | None = None) -> Iterator[EvalBatch]:
    """``dataset`` in order, in batches, from the decoded-image tiers (``images``: the process's)."""
    transform = dataset.transform
    if not isinstance(transform, TestTransform):
        raise TypeError(f"eval_batches needs the deterministic test transform, got {type(transform).__name__}")
    images = _DECODED if images is None else images
    source = dataset.source
    _SOURCES[id(source)] = source
    for start in range(0, len(dataset), batch_size):
        positions = range(start, min(start + batch_size, len(dataset)))
        raw = torch.stack([images.image(source, dataset.indices[i], transform) for i in positions])
        labels = torch.as_tensor([dataset.label(i) for i in positions], dtype=torch.long)
        keys = tuple((id(source), dataset.indices[i]) for i in positions)
        yield EvalBatch(transform.finish(raw), labels, keys)
