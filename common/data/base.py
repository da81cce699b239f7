"""The data interface: labelled image sources, their splits, and a client's view of them.

An :class:`ImageSource` is an indexable collection of labelled images that decodes an image
only when asked for it, so a client touches nothing outside its own shard. Loaders for real
datasets return one :class:`SplitSources` (train/test, optionally val) with shared class names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.seeds import sub_seed


class ImageSource(ABC):
    """Labelled images, decoded lazily. ``labels[i]`` indexes ``class_names``."""

    class_names: list[str]
    labels: np.ndarray
    # Optional per-image domain name (feature-shift datasets); None when there is one domain.
    domains: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def image(self, index: int) -> Image.Image:
        """Decode image ``index`` as RGB."""

    def cache_key(self) -> str | None:
        """A name for this source's pixels, index by index, that any process building the same
        source computes alike (a cache shared between processes, ``common.data.image_store``, files
        decoded images under it); None when there is none, and then only this process caches them."""
        return None


@dataclass(frozen=True)
class SplitSources:
    """A dataset's splits; all share ``class_names``."""

    name: str
    class_names: list[str]
    train: ImageSource
    test: ImageSource
    val: ImageSource | None = None
    # The base classes of a base-to-novel split when the dataset defines its own; None = the
    # first half of the labels (docs/paper.md section 3).
    base_classes: list[int] | None = None


class LabeledDataset(Dataset[tuple[torch.Tensor, int]]):
    """A torch view of ``source[indices]`` with labels remapped to a classifier's classes.

    ``label_map[original_label]`` is the label in the classifier's class list.
    """

    def __init__(
        self,
        source: ImageSource,
        indices: Sequence[int],
        transform: Callable[[Image.Image], torch.Tensor],
        label_map: dict[int, int] | None = None,
    ) -> None:
        self.source = source
        self.indices = [int(i) for i in indices]
        self.transform = transform
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.item(i)

    def label(self, i: int) -> int:
        """Example ``i``'s label in the classifier's class list, without decoding the image."""
        label = int(self.source.labels[self.indices[i]])
        return label if self.label_map is None else self.label_map[label]

    def item(self, i: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """Image ``i`` transformed (a random transform draws from ``generator``) and its label."""
        image = self.source.image(self.indices[i])
        tensor = self.transform(image) if generator is None else self.transform(image, generator)  # type: ignore[call-arg]
        return tensor, self.label(i)


class SeededAugmentation(Dataset[tuple[torch.Tensor, int]]):
    """``dataset`` with image ``i`` of epoch ``e`` augmented from a generator seeded by
    ``(seed, e, i)``: the same draws whatever ran before, in whichever process or worker."""

    def __init__(self, dataset: LabeledDataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(sub_seed(self.seed, self.epoch, i))
        return self.dataset.item(i, generator)


@dataclass(frozen=True)
class EvalSet:
    """Images to classify among ``class_names`` (labels already index that list)."""

    dataset: LabeledDataset
    class_names: list[str]


@dataclass(frozen=True)
class ClientData:
    """What one client trains and evaluates on.

    ``class_names`` is the training classifier; ``evals`` always holds ``"local"`` (the
    client's own test split) and, depending on the partition, ``"base"``, ``"novel"`` (the
    full base and novel test sets) and ``"val"`` (the client's own validation split).
    """

    class_names: list[str]
    train: LabeledDataset
    evals: dict[str, EvalSet]
    domain: str | None = None
    own_classes: tuple[int, ...] = ()  # the client's classes, as indices into ``class_names``
