"""Feature-shift datasets with FedBN's splits: DomainNet (10 classes) and Office-Caltech10.

FedBN ships one pickle per domain and split, ``{domain}_train.pkl`` / ``{domain}_test.pkl``,
each holding a pair ``(paths, class names)`` of equal-length arrays, with the image paths
relative to the data folder that contains ``DomainNet/`` or ``office_caltech_10/``. Class names
are FedBN's ten per dataset, in sorted order (FedBN's own label dictionaries are sorted too, so
labels agree with its code). Paths, labels and domains are built together from the same
entries, so they cannot drift apart; every image carries its domain name. The split files are
pickles: load only trusted files.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

from common.data.base import SplitSources
from common.data.files import (
    DatasetError,
    FileImageSource,
    require_dir,
    require_every_class,
    require_file,
)

DOMAINNET_DOMAINS: tuple[str, ...] = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_CLASSES: tuple[str, ...] = (
    "bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale", "windmill", "wine_glass", "zebra",
)  # fmt: skip
OFFICE_DOMAINS: tuple[str, ...] = ("amazon", "caltech", "dslr", "webcam")
OFFICE_CLASSES: tuple[str, ...] = (
    "back_pack", "bike", "calculator", "headphones", "keyboard", "laptop_computer", "monitor", "mouse", "mug", "projector",
)  # fmt: skip


def _as_str(value: object) -> str:
    # A pickle written by Python 2 holds byte strings (numpy "S" arrays); decode rather than get "b'...'".
    return value.decode() if isinstance(value, bytes) else str(value)


def read_fedbn_split(path: Path, class_names: Sequence[str]) -> tuple[list[str], list[int]]:
    """Paths and labels from one FedBN split pickle; labels index ``class_names``."""
    require_file(path, "a FedBN split file (see docs/datasets.md)")
    try:
        with path.open("rb") as f:
            obj = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as exc:
        raise DatasetError(f"cannot unpickle FedBN split file {path}: {exc}") from exc
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and not any(isinstance(o, (str, bytes)) for o in obj)):
        raise DatasetError(f"{path}: expected a pickled pair (paths, class names), got {type(obj).__name__}")
    try:
        paths, names = [_as_str(p) for p in obj[0]], [_as_str(n) for n in obj[1]]
    except TypeError as exc:
        raise DatasetError(f"{path}: expected a pickled pair of sequences (paths, class names): {exc}") from exc
    if len(paths) != len(names):
        raise DatasetError(f"{path}: {len(paths)} paths but {len(names)} class names; expected one per image")
    label_of = {c: i for i, c in enumerate(class_names)}
    unknown = sorted(set(names) - set(label_of))
    if unknown:
        raise DatasetError(f"{path}: unknown class name(s) {unknown[:10]}; expected one of {list(class_names)}")
    return paths, [label_of[n] for n in names]


def _image_base(root: Path, dataset_dir: Path, pkl: Path, first: str) -> Path:
    """The folder the pickle's paths are relative to, checked on its first entry.

    FedBN joins the paths to its data folder (the parent of ``DomainNet/``); paths relative to
    the dataset folder itself are accepted too. Anything else is an error, not a guess.
    """
    candidates = [root, dataset_dir]
    for base in candidates:
        if (base / first).is_file():
            return base
    tried = ", ".join(str(b / first) for b in candidates)
    raise DatasetError(f"{pkl}: its first image {first!r} was not found (tried {tried})")


def _load_fedbn(
    name: str, root: str | Path, folder: str, all_domains: tuple[str, ...], classes: tuple[str, ...],
    domains: Sequence[str] | None, skip_corrupt: bool,
) -> SplitSources:  # fmt: skip
    data_root = Path(root)
    dataset_dir = require_dir(data_root / folder, f"the {name} folder {folder!r} with FedBN's split files")
    chosen = list(all_domains) if domains is None else list(domains)
    unknown = [d for d in chosen if d not in all_domains]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise DatasetError(f"{name}: domains={chosen!r}; expected distinct names from {list(all_domains)}")
    class_names = list(classes)

    def source(split: str) -> FileImageSource:
        paths: list[str] = []
        labels: list[int] = []
        domain_of: list[str] = []
        for domain in chosen:
            pkl = dataset_dir / f"{domain}_{split}.pkl"
            p, y = read_fedbn_split(pkl, class_names)
            if not p:
                raise DatasetError(f"{pkl}: no images")
            # Store every path relative to the data root so that the source needs a single root.
            if _image_base(data_root, dataset_dir, pkl, p[0]) == dataset_dir:
                p = [f"{folder}/{q}" for q in p]
            paths += p
            labels += y
            domain_of += [domain] * len(p)
        return FileImageSource(paths, labels, class_names, domains=domain_of, root=data_root, skip_corrupt=skip_corrupt)

    train, test = source("train"), source("test")
    require_every_class(train, f"{dataset_dir} (train split files)")
    require_every_class(test, f"{dataset_dir} (test split files)")
    return SplitSources(name=name, class_names=class_names, train=train, test=test, val=None)


def load_domainnet(root: str | Path, domains: Sequence[str] | None = None, skip_corrupt: bool = False) -> SplitSources:
    """FedBN's 10-class DomainNet under ``root/DomainNet``; ``domains`` picks a subset."""
    return _load_fedbn("domainnet", root, "DomainNet", DOMAINNET_DOMAINS, DOMAINNET_CLASSES, domains, skip_corrupt)


def load_office_caltech10(
    root: str | Path, domains: Sequence[str] | None = None, skip_corrupt: bool = False
) -> SplitSources:
    """Office-Caltech10 under ``root/office_caltech_10``; ``domains`` picks a subset."""
    return _load_fedbn(
        "office_caltech10", root, "office_caltech_10", OFFICE_DOMAINS, OFFICE_CLASSES, domains, skip_corrupt
    )
