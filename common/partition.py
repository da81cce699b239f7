"""Seeded, reproducible splits of a dataset over clients (SPEC §3)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BaseNovelPartition:
    """Classes sorted by label: first ceil(C/2) are base, the rest novel.

    Base classes are shuffled with the seed and dealt to clients in disjoint contiguous
    chunks (the paper's pathological split); ``client_classes[i]`` is client i's chunk.
    """

    base_classes: list[int]
    novel_classes: list[int]
    client_classes: list[list[int]]


def base_to_novel(num_classes: int, num_clients: int, seed: int) -> BaseNovelPartition:
    num_base = math.ceil(num_classes / 2)
    if num_clients > num_base:
        raise ValueError(
            f"num-partitions={num_clients} exceeds the {num_base} base classes; "
            "every client needs at least one class of its own"
        )
    base = list(range(num_base))
    shuffled = np.random.default_rng(seed).permutation(base).tolist()
    chunks = np.array_split(np.array(shuffled), num_clients)
    return BaseNovelPartition(
        base_classes=base,
        novel_classes=list(range(num_base, num_classes)),
        client_classes=[sorted(int(c) for c in chunk) for chunk in chunks],
    )


def few_shot_indices(labels: np.ndarray, classes: Sequence[int], shots: int, seed: int) -> list[int]:
    """``shots`` indices of each class in ``classes`` (all of them when fewer exist)."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in classes:
        pool = np.flatnonzero(labels == c)
        if len(pool) == 0:
            raise ValueError(f"class {c} has no images in this split")
        chosen.extend(sorted(rng.choice(pool, size=min(shots, len(pool)), replace=False).tolist()))
    return chosen


def indices_of_classes(labels: np.ndarray, classes: Sequence[int]) -> list[int]:
    return np.flatnonzero(np.isin(labels, list(classes))).tolist()
