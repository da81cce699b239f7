"""Evaluation images decoded once per process, and image features computed once per frozen tower.

Every client evaluates every round, and in the base-to-novel protocol every client of a node
evaluates the same Base and Novel test sets. Decoding and resizing those images again each time
was most of an evaluation's cost. Here a test image is decoded, resized and centre-cropped once
per process (a Ray actor in simulation, the warm worker in deployment) and kept as uint8, a
quarter of its float size; the float conversion and normalisation run per batch, with the same
arithmetic as the per-image transform, so the tensors are bit-identical (a test checks this).

Images are cached until a byte budget (``eval-cache-mb`` in the node config) is reached; later
ones are decoded each time. Nothing here is client-specific: the key is (source, index).
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


class DecodedImages:
    """uint8 test images per (source, index, transform geometry), up to ``budget_bytes``."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._images: dict[tuple, torch.Tensor] = {}
        self._warned = False

    def image(self, source: ImageSource, index: int, transform: TestTransform) -> torch.Tensor:
        key = (id(source), index, transform.geometry_key)
        cached = self._images.get(key)
        if cached is not None:
            return cached
        decoded = transform.geometry(source.image(index))
        if self.used_bytes + decoded.numel() <= self.budget_bytes:
            self._images[key] = decoded
            self.used_bytes += decoded.numel()
        elif not self._warned:
            self._warned = True
            log.info("evaluation image cache full (%d MB): further images are decoded every time", self.used_bytes >> 20)
        return decoded


_DECODED = DecodedImages(DEFAULT_BUDGET_MB << 20)
# Every source a key names is held here, so that its id stays its own for the process's life
# (sources are few and already cached by common.data.federated).
_SOURCES: dict[int, ImageSource] = {}


def set_budget_mb(megabytes: int) -> None:
    """The process's cache budget (the node's ``eval-cache-mb``); 0 turns caching off."""
    if _DECODED.budget_bytes != megabytes << 20:
        _DECODED.budget_bytes = megabytes << 20
        if _DECODED.used_bytes > _DECODED.budget_bytes:
            _DECODED._images.clear()
            _DECODED.used_bytes = 0


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


class ImageFeatureCache:
    """Normalised image features per (model, autocast, source id, index), for image towers that
    nothing trains (the prompt methods and zero-shot): an image's feature never changes there.

    Keyed weakly by the model, so a rebuilt backbone never reads another's features.
    """

    def __init__(self) -> None:
        self._by_model: weakref.WeakKeyDictionary[nn.Module, dict[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()

    def lookup(self, model: nn.Module, setting: tuple, keys: tuple[tuple[int, int], ...]) -> torch.Tensor | None:
        table = self._by_model.get(model, {})
        rows = [table.get((setting, key)) for key in keys]
        if any(row is None for row in rows):
            return None
        return torch.stack(rows)  # type: ignore[arg-type]

    def store(self, model: nn.Module, setting: tuple, keys: tuple[tuple[int, int], ...], features: torch.Tensor) -> None:
        table = self._by_model.setdefault(model, {})
        for key, row in zip(keys, features.detach(), strict=True):
            table[(setting, key)] = row.clone()


IMAGE_FEATURES = ImageFeatureCache()
