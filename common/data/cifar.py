"""CIFAR-10 and CIFAR-100 from the python pickle archives as distributed by the dataset authors.

``cifar-10-batches-py/`` holds ``data_batch_1..5``, ``test_batch`` and ``batches.meta``;
``cifar-100-python/`` holds ``train``, ``test`` and ``meta`` (fine labels are used). Each batch is
a pickled dict whose ``data`` is a ``uint8`` array of shape ``(N, 3072)``: per image the red,
green and blue 32x32 planes, row-major. The arrays stay as they are in memory and an image is
only turned into a PIL image when asked for. The archives are pickles: load only trusted files.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.data.base import ImageSource, SplitSources
from common.data.files import (
    DatasetError,
    require_dir,
    require_every_class,
    require_file,
)


class ArrayImageSource(ImageSource):
    """32x32 RGB images kept as CIFAR's flat ``(N, 3072)`` uint8 rows; decoded per index."""

    def __init__(self, data: np.ndarray, labels: Sequence[int] | np.ndarray, class_names: Sequence[str]) -> None:
        self.data = data
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.class_names = list(class_names)

    def image(self, index: int) -> Image.Image:
        planes = self.data[index].reshape(3, 32, 32)
        return Image.fromarray(np.ascontiguousarray(planes.transpose(1, 2, 0)), mode="RGB")

    def cache_key(self) -> str:
        """The pixels themselves (hashed once per array, about 30 MB for a test set)."""
        memo = self.__dict__.get("_cache_key_memo")
        if memo is None or memo[0] is not self.data:
            digest = hashlib.blake2b(np.ascontiguousarray(self.data).data, digest_size=16).hexdigest()
            memo = self._cache_key_memo = (self.data, f"array:{self.data.shape}:{digest}")
        return memo[1]


def _load_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with ``str`` keys.

    The archives were written by Python 2, so they are read with ``encoding="bytes"`` and the
    keys (and any byte-string values in lists) come back as bytes; they are decoded here.
    """
    require_file(path, "a CIFAR python pickle (see docs/datasets.md)")
    try:
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
        raise DatasetError(f"cannot unpickle CIFAR file {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _field(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise DatasetError(f"{path}: missing key {key!r}; found {sorted(batch)}")
    return batch[key]


def _names(meta: dict[str, Any], key: str, path: Path) -> list[str]:
    names = _field(meta, key, path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _read_batches(paths: list[Path], label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    datas, labels = [], []
    for path in paths:
        batch = _load_pickle(path)
        data = np.asarray(_field(batch, "data", path))
        y = np.asarray(_field(batch, label_key, path)).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetError(f"{path}: 'data' is {data.dtype} {data.shape}; expected uint8 (N, 3072)")
        if len(y) != len(data) or not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(f"{path}: {len(y)} {label_key!r} for {len(data)} images; expected one integer per image")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DatasetError(f"{path}: labels {y.min()}..{y.max()} outside [0, {num_classes})")
        datas.append(data)
        labels.append(y)
    return np.concatenate(datas), np.concatenate(labels)


def _split_sources(
    name: str, folder: Path, train: list[Path], test: list[Path], label_key: str, names: list[str]
) -> SplitSources:
    sources = []
    for files in (train, test):
        data, labels = _read_batches(files, label_key, len(names))
        source = ArrayImageSource(data, labels, names)
        require_every_class(source, f"{folder} ({', '.join(f.name for f in files)})")
        sources.append(source)
    return SplitSources(name=name, class_names=names, train=sources[0], test=sources[1], val=None)


def load_cifar10(root: str | Path) -> SplitSources:
    """CIFAR-10 from ``root/cifar-10-batches-py``."""
    folder = require_dir(Path(root) / "cifar-10-batches-py", "the extracted cifar-10-python.tar.gz")
    meta_path = folder / "batches.meta"
    names = _names(_load_pickle(meta_path), "label_names", meta_path)
    train = [folder / f"data_batch_{i}" for i in range(1, 6)]
    return _split_sources("cifar10", folder, train, [folder / "test_batch"], "labels", names)


def load_cifar100(root: str | Path) -> SplitSources:
    """CIFAR-100 (fine labels) from ``root/cifar-100-python``; names keep their underscores."""
    folder = require_dir(Path(root) / "cifar-100-python", "the extracted cifar-100-python.tar.gz")
    meta_path = folder / "meta"
    names = _names(_load_pickle(meta_path), "fine_label_names", meta_path)
    return _split_sources("cifar100", folder, [folder / "train"], [folder / "test"], "fine_labels", names)
