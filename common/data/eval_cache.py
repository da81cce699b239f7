"""Evaluation images decoded once per process, and image features computed once per frozen tower.

Every client evaluates every round, and in the base-to-novel protocol every client of a node
evaluates the same Base and Novel test sets. Decoding and resizing those images again each time
was most of an evaluation's cost. Here a test image is decoded, resized and centre-cropped once
per process (a Ray actor in simulation, the warm worker in deployment) and kept as uint8, a
quarter of its float size; the float conversion and normalisation run per batch, with the same
arithmetic as the per-image transform, so the tensors are bit-identical (a test checks this).

What the image tower computes from a test image is reused where it cannot change: the whole
feature when nothing in the image tower trains (prompt methods, zero-shot), and otherwise the
hidden state after the frozen blocks before the first adapter (``common.model.image``). These rows
are keyed weakly by the model object, so a rebuilt backbone starts afresh.

All of it shares one byte budget (``eval-cache-mb`` in the node config); past it, items are
computed each time. Nothing here is client-specific: the key is (source, index), and a client's
own adapters only ever act on what comes after the cached part.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from common.data.base import ImageSource, LabeledDataset
from common.transforms import TestTransform

log = logging.getLogger(__name__)

DEFAULT_BUDGET_MB = 2048


@dataclass(frozen=True)
class EvalBatch:
    images: torch.Tensor  # normalised, as the test transform gives them
    labels: torch.Tensor
    keys: tuple[tuple[int, int], ...]  # (source id, index) per image: what a feature cache keys on


class Budget:
    """Bytes the process's evaluation caches may hold together."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes, self.used_bytes = limit_bytes, 0
        self.full_logged = False

    def take(self, nbytes: int) -> bool:
        if self.used_bytes + nbytes > self.limit_bytes:
            if not self.full_logged:
                self.full_logged = True
                log.info("evaluation caches full (%d MB): further items are computed every time", self.used_bytes >> 20)
            return False
        self.used_bytes += nbytes
        return True


_BUDGET = Budget(DEFAULT_BUDGET_MB << 20)


class DecodedImages:
    """uint8 test images per (source, index, transform geometry), within ``budget``."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._images: dict[tuple, torch.Tensor] = {}

    def image(self, source: ImageSource, index: int, transform: TestTransform) -> torch.Tensor:
        key = (id(source), index, transform.geometry_key)
        cached = self._images.get(key)
        if cached is not None:
            return cached
        decoded = transform.geometry(source.image(index))
        if self.budget.take(decoded.numel() * decoded.element_size()):
            self._images[key] = decoded
        return decoded

    def clear(self) -> None:
        self._images.clear()


class RowCache:
    """One tensor row per (model, setting, source id, index): an image's frozen image-tower
    feature, or its hidden state after the frozen blocks. Keyed weakly by the model, so a
    rebuilt backbone never reads another's rows."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._by_model: weakref.WeakKeyDictionary[nn.Module, dict[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()

    def lookup(self, model: nn.Module, setting: tuple, keys: tuple[tuple[int, int], ...]) -> torch.Tensor | None:
        table = self._by_model.get(model, {})
        rows = [table.get((setting, key)) for key in keys]
        if any(row is None for row in rows):
            return None
        return torch.stack(rows)  # type: ignore[arg-type]

    def store(self, model: nn.Module, setting: tuple, keys: tuple[tuple[int, int], ...], rows: torch.Tensor) -> None:
        table = self._by_model.setdefault(model, {})
        for key, row in zip(keys, rows.detach(), strict=True):
            if (setting, key) not in table and self.budget.take(row.numel() * row.element_size()):
                table[(setting, key)] = row.clone()

    def clear(self) -> None:
        self._by_model = weakref.WeakKeyDictionary()


_DECODED = DecodedImages(_BUDGET)
IMAGE_FEATURES = RowCache(_BUDGET)  # image towers nothing trains (prompt methods, zero-shot)
IMAGE_PREFIX = RowCache(_BUDGET)  # hidden states after the frozen blocks (adapter methods)
# Every source a key names is held here, so that its id stays its own for the process's life
# (sources are few and already cached by common.data.federated).
_SOURCES: dict[int, ImageSource] = {}


def set_budget_mb(megabytes: int) -> None:
    """The process's cache budget (the node's ``eval-cache-mb``); 0 turns caching off."""
    if _BUDGET.limit_bytes != megabytes << 20:
        _BUDGET.limit_bytes = megabytes << 20
        if _BUDGET.used_bytes > _BUDGET.limit_bytes:
            for cache in (_DECODED, IMAGE_FEATURES, IMAGE_PREFIX):
                cache.clear()
            _BUDGET.used_bytes, _BUDGET.full_logged = 0, False


def cacheable(dataset: object) -> bool:
    return isinstance(dataset, LabeledDataset) and isinstance(dataset.transform, TestTransform)


def eval_batches(dataset: LabeledDataset, batch_size: int) -> Iterator[EvalBatch]:
    """``dataset`` in order, in batches, from the process's decoded-image cache."""
    transform = dataset.transform
    if not isinstance(transform, TestTransform):
        raise TypeError(f"eval_batches needs the deterministic test transform, got {type(transform).__name__}")
    source = dataset.source
    _SOURCES[id(source)] = source
    for start in range(0, len(dataset), batch_size):
        positions = range(start, min(start + batch_size, len(dataset)))
        raw = torch.stack([_DECODED.image(source, dataset.indices[i], transform) for i in positions])
        labels = torch.as_tensor([dataset.label(i) for i in positions], dtype=torch.long)
        keys = tuple((id(source), dataset.indices[i]) for i in positions)
        yield EvalBatch(transform.finish(raw), labels, keys)
