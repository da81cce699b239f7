"""The CoOp benchmark family, read from the layouts and fixed splits CoOp publishes.

Nine datasets come with CoOp's ``split_zhou_*.json`` files: a JSON object with keys ``train``,
``val`` and ``test``, each a list of ``[image path relative to the image folder, label, class
name]``. Class names are taken from those entries (CoOp already applied its renames when it
wrote them) and ordered by label, as CoOp's ``lab2cname`` does. FGVC-Aircraft uses the
dataset's own ``images_variant_*.txt`` lists and ImageNet its class folders plus CoOp's
``classnames.txt``, as in CoOp. The exact layouts are in ``docs/datasets.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.data.base import SplitSources
from common.data.files import (
    DatasetError,
    FileImageSource,
    list_images,
    read_text_lines,
    require_dir,
    require_every_class,
    require_file,
)

# CoOp's renames of raw folder names. The published split files already carry the new names;
# applying the maps again is a no-op on them and makes a split regenerated from the raw folders
# (which then has the old names) read the same.
CALTECH101_NEW_CNAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
EUROSAT_NEW_CNAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


@dataclass(frozen=True)
class CoOpLayout:
    """Where a split-file dataset lives under the data directory."""

    folder: str  # the dataset's folder under data-dir
    image_dir: str  # the folder the split file's paths are relative to, under ``folder``
    split_file: str
    rename: Callable[[str], str] | None = None


SPLIT_FILE_DATASETS: dict[str, CoOpLayout] = {
    "caltech101": CoOpLayout(
        "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", lambda c: CALTECH101_NEW_CNAMES.get(c, c)
    ),
    # CoOp lower-cases the breed names taken from the file names (e.g. "Abyssinian").
    "oxford_pets": CoOpLayout("oxford_pets", "images", "split_zhou_OxfordPets.json", str.lower),
    # Split paths start with cars_train/ or cars_test/, relative to the dataset folder itself.
    "stanford_cars": CoOpLayout("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": CoOpLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": CoOpLayout("food-101", "images", "split_zhou_Food101.json"),
    "sun397": CoOpLayout("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": CoOpLayout("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": CoOpLayout("eurosat", "2750", "split_zhou_EuroSAT.json", lambda c: EUROSAT_NEW_CNAMES.get(c, c)),
    "ucf101": CoOpLayout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
COOP_NAMES: tuple[str, ...] = (*SPLIT_FILE_DATASETS, "fgvc_aircraft", "imagenet")

Entry = tuple[str, int, str]


def read_split_file(path: Path) -> dict[str, list[Entry]]:
    """Parse and validate a CoOp split file into ``{"train"|"val"|"test": [(path, label, name)]}``."""
    require_file(path, "CoOp split file (see docs/datasets.md for where to get it)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"split file {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise DatasetError(
            f"split file {path}: expected a JSON object with keys train/val/test, got {type(raw).__name__}"
        )
    out: dict[str, list[Entry]] = {}
    for split in ("train", "val", "test"):
        if split not in raw:
            raise DatasetError(f"split file {path}: missing key {split!r} (expected keys train, val, test)")
        if not isinstance(raw[split], list):
            raise DatasetError(f"split file {path}: {split!r} must be a list, got {type(raw[split]).__name__}")
        entries: list[Entry] = []
        for i, item in enumerate(raw[split]):
            ok = (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], str)
                and isinstance(item[1], int)
                and not isinstance(item[1], bool)
                and item[1] >= 0
                and isinstance(item[2], str)
            )
            if not ok:
                raise DatasetError(
                    f"split file {path}: {split}[{i}] = {item!r}; expected [relative image path, label >= 0, class name]"
                )
            entries.append((item[0], item[1], item[2]))
        out[split] = entries
    return out


def class_names_from_entries(entries: list[Entry], where: str) -> list[str]:
    """Names ordered by label; every label 0..C-1 must occur with exactly one name."""
    names: dict[int, str] = {}
    for rel, label, name in entries:
        if names.setdefault(label, name) != name:
            raise DatasetError(f"{where}: label {label} is named both {names[label]!r} and {name!r} (at {rel})")
    if not names:
        raise DatasetError(f"{where}: no entries")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise DatasetError(f"{where}: no images for label(s) {missing[:10]}; labels must run 0..{max(names)}")
    return [names[k] for k in range(len(names))]


def load_split_file_dataset(name: str, root: str | Path, skip_corrupt: bool = False) -> SplitSources:
    """One of :data:`SPLIT_FILE_DATASETS`, read with its CoOp split file under ``root``."""
    layout = SPLIT_FILE_DATASETS[name]
    folder = require_dir(Path(root) / layout.folder, f"the {name} dataset folder {layout.folder!r}")
    image_dir = require_dir(folder / layout.image_dir, f"the {name} image folder") if layout.image_dir else folder
    split_path = folder / layout.split_file
    splits = read_split_file(split_path)
    if layout.rename is not None:
        splits = {s: [(p, y, layout.rename(c)) for p, y, c in e] for s, e in splits.items()}
    class_names = class_names_from_entries([e for s in splits.values() for e in s], str(split_path))

    def source(split: str) -> FileImageSource:
        entries = splits[split]
        return FileImageSource(
            [p for p, _, _ in entries],
            [y for _, y, _ in entries],
            class_names,
            root=image_dir,
            skip_corrupt=skip_corrupt,
        )

    train, val, test = source("train"), source("val"), source("test")
    require_every_class(train, f"{split_path} (train)")
    require_every_class(test, f"{split_path} (test)")
    return SplitSources(name=name, class_names=class_names, train=train, test=test, val=val if len(val) else None)


def load_fgvc_aircraft(root: str | Path, skip_corrupt: bool = False) -> SplitSources:
    """FGVC-Aircraft variants: labels follow the order of ``variants.txt``, as in CoOp."""
    folder = require_dir(Path(root) / "fgvc_aircraft", "the FGVC-Aircraft 'data/' folder renamed to 'fgvc_aircraft'")
    image_dir = require_dir(folder / "images", "FGVC-Aircraft images")
    class_names = read_text_lines(folder / "variants.txt", "the FGVC-Aircraft variant list")
    label_of = {c: i for i, c in enumerate(class_names)}

    def source(split: str) -> FileImageSource:
        list_path = folder / f"images_variant_{split}.txt"
        paths, labels = [], []
        for n, line in enumerate(read_text_lines(list_path, f"FGVC-Aircraft {split} list"), start=1):
            image_id, _, variant = line.partition(" ")
            if variant not in label_of:
                raise DatasetError(f"{list_path} line {n}: {line!r}; expected '<image id> <variant from variants.txt>'")
            paths.append(f"{image_id}.jpg")
            labels.append(label_of[variant])
        return FileImageSource(paths, labels, class_names, root=image_dir, skip_corrupt=skip_corrupt)

    train, val, test = source("train"), source("val"), source("test")
    require_every_class(train, f"{folder / 'images_variant_train.txt'}")
    require_every_class(test, f"{folder / 'images_variant_test.txt'}")
    return SplitSources(name="fgvc_aircraft", class_names=class_names, train=train, test=test, val=val)


def read_imagenet_classnames(path: Path) -> dict[str, str]:
    """``classnames.txt``: one ``<wnid> <class name>`` per line (CLIP's ImageNet names)."""
    names: dict[str, str] = {}
    for n, line in enumerate(read_text_lines(path, "ImageNet classnames.txt"), start=1):
        wnid, _, name = line.partition(" ")
        if not name.strip():
            raise DatasetError(f"{path} line {n}: {line!r}; expected '<wnid> <class name>'")
        names[wnid] = name.strip()
    return names


def load_imagenet(root: str | Path, skip_corrupt: bool = False) -> SplitSources:
    """ImageNet from ``imagenet/images/{train,val}/<wnid>/``; the val set is the test set.

    Labels follow the sorted wnid folders, as in CoOp. CoOp also uses the val set as its
    validation split; here ``val`` is left empty so that nothing is selected on test data.
    """
    folder = require_dir(Path(root) / "imagenet", "the ImageNet folder 'imagenet'")
    wnid_names = read_imagenet_classnames(folder / "classnames.txt")
    train_dir = require_dir(folder / "images" / "train", "ImageNet train class folders")
    test_dir = require_dir(folder / "images" / "val", "ImageNet val class folders (val/<wnid>/...)")
    wnids = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not wnids:
        raise DatasetError(f"{train_dir}: no class folders; expected one folder per wnid")
    unnamed = [w for w in wnids if w not in wnid_names]
    if unnamed:
        raise DatasetError(f"{folder / 'classnames.txt'}: no name for class folder(s) {unnamed[:10]}")
    class_names = [wnid_names[w] for w in wnids]
    label_of = {w: i for i, w in enumerate(wnids)}

    def source(split_dir: Path) -> FileImageSource:
        paths, labels = [], []
        for d in sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")):
            if d.name not in label_of:
                raise DatasetError(f"{d}: class folder not among the train classes in {train_dir}")
            files = list_images(d)
            paths += [f"{d.name}/{f}" for f in files]
            labels += [label_of[d.name]] * len(files)
        return FileImageSource(paths, labels, class_names, root=split_dir, skip_corrupt=skip_corrupt)

    train, test = source(train_dir), source(test_dir)
    require_every_class(train, str(train_dir))
    require_every_class(test, str(test_dir))
    return SplitSources(name="imagenet", class_names=class_names, train=train, test=test, val=None)


def load_coop(name: str, root: str | Path, skip_corrupt: bool = False) -> SplitSources:
    """Any dataset of :data:`COOP_NAMES` under the data directory ``root``."""
    if name == "fgvc_aircraft":
        return load_fgvc_aircraft(root, skip_corrupt)
    if name == "imagenet":
        return load_imagenet(root, skip_corrupt)
    if name not in SPLIT_FILE_DATASETS:
        raise DatasetError(f"unknown CoOp dataset {name!r}; valid: {', '.join(COOP_NAMES)}")
    return load_split_file_dataset(name, root, skip_corrupt)
