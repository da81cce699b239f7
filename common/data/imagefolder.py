"""Any image dataset laid out as one folder per class.

Either pre-split, ``root/train/<class>/...`` and ``root/test/<class>/...`` (optionally
``root/val/<class>/...``), or unsplit, ``root/<class>/...``, in which case each class is split
into train/test (and optionally val) with a seed. Class names are the sorted folder names,
underscores kept: the prompt code turns them into spaces. Images are .jpg, .jpeg, .png, .bmp or
.webp files, at any depth below the class folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from common.data.base import SplitSources
from common.data.files import (
    IMAGE_EXTENSIONS,
    DatasetError,
    FileImageSource,
    list_images,
    require_dir,
    require_every_class,
)


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _scan(folder: Path, class_names: list[str]) -> tuple[list[str], list[int]]:
    """Every image of every class folder in ``folder``; an empty class folder is an error."""
    label_of = {c: i for i, c in enumerate(class_names)}
    paths: list[str] = []
    labels: list[int] = []
    for name in _class_dirs(folder):
        if name not in label_of:
            raise DatasetError(f"{folder / name}: class folder not among the train classes {class_names[:10]}...")
        files = list_images(folder / name)
        if not files:
            raise DatasetError(
                f"{folder / name}: class folder holds no images (expected files ending in {IMAGE_EXTENSIONS})"
            )
        paths += [f"{name}/{f}" for f in files]
        labels += [label_of[name]] * len(files)
    return paths, labels


def _class_rng(seed: int, class_name: str) -> np.random.Generator:
    # Seeded by class name as well, so adding a class leaves the other classes' splits unchanged.
    digest = hashlib.blake2b(class_name.encode(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def load_imagefolder(
    root: str | Path,
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_corrupt: bool = False,
    name: str = "imagefolder",
) -> SplitSources:
    """Class folders under ``root``; the fractions and seed apply only to the unsplit layout."""
    root = require_dir(Path(root), "an image-folder dataset (root/<class>/*.jpg or root/{train,test}/<class>/...)")
    if (root / "train").is_dir():
        train_dir = root / "train"
        test_dir = require_dir(root / "test", "the test class folders next to 'train'")
        class_names = _class_dirs(train_dir)
        if not class_names:
            raise DatasetError(f"{train_dir}: no class folders; expected {train_dir}/<class>/*.jpg")
        train = FileImageSource(*_scan(train_dir, class_names), class_names, root=train_dir, skip_corrupt=skip_corrupt)
        test = FileImageSource(*_scan(test_dir, class_names), class_names, root=test_dir, skip_corrupt=skip_corrupt)
        val = None
        if (root / "val").is_dir():
            val = FileImageSource(
                *_scan(root / "val", class_names), class_names, root=root / "val", skip_corrupt=skip_corrupt
            )
        require_every_class(train, str(train_dir))
        return SplitSources(name=name, class_names=class_names, train=train, test=test, val=val)

    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ValueError(
            f"test_fraction={test_fraction}, val_fraction={val_fraction}; expected 0 < test, 0 <= val, test + val < 1"
        )
    class_names = _class_dirs(root)
    if not class_names:
        raise DatasetError(f"{root}: no class folders; expected {root}/<class>/*.jpg or {root}/train and {root}/test")
    paths, labels = _scan(root, class_names)
    labels_arr = np.asarray(labels)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label, cname in enumerate(class_names):
        idx = np.flatnonzero(labels_arr == label)
        n = len(idx)
        n_test = max(1, round(n * test_fraction))
        n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
        if n - n_test - n_val < 1:
            raise DatasetError(
                f"{root / cname}: {n} image(s) cannot be split into train/test{'/val' if n_val else ''}; "
                f"expected at least {2 + (n_val > 0)}"
            )
        perm = idx[_class_rng(seed, cname).permutation(n)]
        parts["test"] += perm[:n_test].tolist()
        parts["val"] += perm[n_test : n_test + n_val].tolist()
        parts["train"] += perm[n_test + n_val :].tolist()

    def source(split: str) -> FileImageSource:
        chosen = sorted(parts[split])  # keep the class-major, file-sorted order within a split
        return FileImageSource(
            [paths[i] for i in chosen], labels_arr[chosen], class_names, root=root, skip_corrupt=skip_corrupt
        )

    train = source("train")
    require_every_class(train, f"{root} (train part)")  # only fails if skip_corrupt dropped a class
    val_source = source("val") if val_fraction > 0 else None
    return SplitSources(name=name, class_names=class_names, train=train, test=source("test"), val=val_source)
