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


@dataclass(frozen=True)
class SplitSources:
    """A dataset's splits; all share ``class_names``."""

    name: str
    class_names: list[str]
    train: ImageSource
    test: ImageSource
    val: ImageSource | None = None


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
        index = self.indices[i]
        label = int(self.source.labels[index])
        if self.label_map is not None:
            label = self.label_map[label]
        return self.transform(self.source.image(index)), label


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
