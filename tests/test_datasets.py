"""Dataset loaders on tiny fixture folders built in each dataset's exact on-disk layout.

Images are solid colours that encode (class, index), so a test can tell that the decoded image
is the one the label says. Every bad-input case must raise with the offending path named.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data import files as files_module
from common.data.base import ImageSource
from common.data.coop import SPLIT_FILE_DATASETS
from common.data.domains import (
    DOMAINNET_CLASSES,
    DOMAINNET_DOMAINS,
    OFFICE_CLASSES,
    OFFICE_DOMAINS,
)
from common.data.files import DatasetError, FileImageSource
from common.data.registry import DATASET_NAMES, dataset_options, load_dataset


def colour(label: int, index: int) -> tuple[int, int, int]:
    return (40 + 20 * label % 200, 30 + 15 * index % 200, 90)


def write_image(path: Path, rgb: tuple[int, int, int], size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}[path.suffix.lower()]
    Image.new("RGB", (size, size), rgb).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))


def assert_colour(img: Image.Image, rgb: tuple[int, int, int]) -> None:
    assert img.mode == "RGB"
    # JPEG is lossy even on a flat colour, by a level or two.
    assert np.abs(np.asarray(img, dtype=np.int64) - np.array(rgb)).max() <= 3


# ---------------------------------------------------------------------------------------------
# CoOp split-file datasets


RAW_NAMES = {
    "caltech101": (["accordion", "Faces", "airplanes"], ["accordion", "face", "airplane"]),
    "oxford_pets": (["Abyssinian", "american_bulldog", "Bengal"], ["abyssinian", "american_bulldog", "bengal"]),
    "eurosat": (["AnnualCrop", "Forest", "SeaLake"], ["Annual Crop Land", "Forest", "Sea or Lake"]),
}


def make_coop(root: Path, name: str, per_split: dict[str, int] | None = None) -> tuple[list[str], dict]:
    """A 3-class dataset in CoOp's layout with its split file; returns (expected names, split)."""
    layout = SPLIT_FILE_DATASETS[name]
    raw, expected = RAW_NAMES.get(name, (["cls_a", "cls b", "cls_c"], ["cls_a", "cls b", "cls_c"]))
    image_dir = root / layout.folder / layout.image_dir
    per_split = per_split or {"train": 2, "val": 1, "test": 2}
    split: dict[str, list] = {}
    for s, n in per_split.items():
        split[s] = []
        for label in (2, 0, 1):  # entries need not be grouped by label
            for i in range(n):
                rel = f"{raw[label].replace(' ', '_')}/{s}_{i}.jpg"
                index = len(split[s])
                write_image(image_dir / rel, colour(label, index))
                split[s].append([rel, label, raw[label]])
    (root / layout.folder / layout.split_file).write_text(json.dumps(split))
    return expected, split


@pytest.mark.parametrize("name", sorted(SPLIT_FILE_DATASETS))
def test_coop_split_file_dataset(tmp_path: Path, name: str) -> None:
    expected, split = make_coop(tmp_path, name)
    data = load_dataset(name, tmp_path)
    assert data.name == name
    assert data.class_names == expected
    assert data.val is not None
    for s, source in (("train", data.train), ("val", data.val), ("test", data.test)):
        assert source.class_names == expected
        assert source.domains is None
        assert source.labels.tolist() == [e[1] for e in split[s]]
        for i in range(len(source)):
            assert_colour(source.image(i), colour(int(source.labels[i]), i))


def test_stanford_cars_paths_are_relative_to_dataset_folder(tmp_path: Path) -> None:
    layout = SPLIT_FILE_DATASETS["stanford_cars"]
    assert (layout.folder, layout.image_dir) == ("stanford_cars", "")
    make_coop(tmp_path, "stanford_cars")
    data = load_dataset("Stanford-Cars", tmp_path)
    assert isinstance(data.train, FileImageSource)
    assert data.train.path(0).parent.parent == tmp_path / "stanford_cars"


def test_coop_folder_names_match_coop() -> None:
    folders = {k: (v.folder, v.image_dir, v.split_file) for k, v in SPLIT_FILE_DATASETS.items()}
    assert folders == {
        "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
        "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
        "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
        "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
        "food101": ("food-101", "images", "split_zhou_Food101.json"),
        "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
        "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
        "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
        "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    }


def test_fgvc_aircraft(tmp_path: Path) -> None:
    folder = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    folder.mkdir()
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    lists = {
        "train": [("0001", 2), ("0002", 0), ("0003", 1)],
        "val": [("0004", 1)],
        "test": [("0005", 0), ("0006", 1), ("0007", 2)],
    }
    for split, items in lists.items():
        (folder / f"images_variant_{split}.txt").write_text("".join(f"{i} {variants[y]}\n" for i, y in items))
        for k, (i, y) in enumerate(items):
            write_image(folder / "images" / f"{i}.jpg", colour(y, k))
    data = load_dataset("fgvc_aircraft", tmp_path)
    assert data.class_names == variants
    assert data.train.labels.tolist() == [2, 0, 1]
    assert data.val is not None and len(data.val) == 1
    assert data.test.labels.tolist() == [0, 1, 2]
    assert_colour(data.test.image(2), colour(2, 2))


def test_fgvc_unknown_variant_names_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "fgvc_aircraft"
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("A\nB\n")
    for split in ("train", "val", "test"):
        (folder / f"images_variant_{split}.txt").write_text("1 A\n2 B\n")
    (folder / "images_variant_val.txt").write_text("1 A\n2 Z\n")
    with pytest.raises(DatasetError, match=r"images_variant_val\.txt line 2"):
        load_dataset("fgvc_aircraft", tmp_path)


def make_imagenet(root: Path) -> None:
    folder = root / "imagenet"
    folder.mkdir()
    (folder / "classnames.txt").write_text("n001 tench\nn002 goldfish\nn003 great white shark\n")
    for split, n in (("train", 2), ("val", 1)):
        for label, wnid in enumerate(["n001", "n002", "n003"]):
            for i in range(n):
                write_image(folder / "images" / split / wnid / f"{wnid}_{i}.JPEG", colour(label, i))


def test_imagenet(tmp_path: Path) -> None:
    make_imagenet(tmp_path)
    data = load_dataset("ImageNet", tmp_path)
    assert data.class_names == ["tench", "goldfish", "great white shark"]
    assert data.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.test.labels.tolist() == [0, 1, 2]
    assert data.val is None  # CoOp's val is the test set; never select on it
    assert_colour(data.train.image(3), colour(1, 1))


def test_imagenet_folder_without_name(tmp_path: Path) -> None:
    make_imagenet(tmp_path)
    (tmp_path / "imagenet" / "classnames.txt").write_text("n001 tench\nn002 goldfish\n")
    with pytest.raises(DatasetError, match=r"classnames\.txt.*n003"):
        load_dataset("imagenet", tmp_path)


# ---------------------------------------------------------------------------------------------
# CIFAR


def cifar_rows(labels: list[int]) -> np.ndarray:
    """CIFAR's flat layout: 1024 red, then 1024 green, then 1024 blue values per image."""
    rows = []
    for i, y in enumerate(labels):
        r, g, b = colour(y, i)
        rows.append(np.concatenate([np.full(1024, r), np.full(1024, g), np.full(1024, b)]))
    return np.asarray(rows, dtype=np.uint8)


def dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def test_cifar10(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    names = [b"airplane", b"automobile", b"bird"]
    dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 2, b"num_vis": 3072})
    for i in range(1, 6):
        y = [i % 3, (i + 1) % 3]
        dump(
            folder / f"data_batch_{i}",
            {b"batch_label": b"x", b"labels": y, b"data": cifar_rows(y), b"filenames": [b"a", b"b"]},
        )
    dump(folder / "test_batch", {b"labels": [0, 1, 2], b"data": cifar_rows([0, 1, 2]), b"filenames": [b"a"] * 3})
    data = load_dataset("CIFAR10", tmp_path)
    assert data.class_names == ["airplane", "automobile", "bird"]
    assert len(data.train) == 10 and len(data.test) == 3
    assert data.train.labels.tolist()[:4] == [1, 2, 2, 0]
    assert_colour(data.train.image(1), colour(2, 1))
    # A pixel-exact check that the planes are put back as (row, column, channel).
    pixels = np.asarray(data.test.image(2))
    assert pixels.shape == (32, 32, 3) and tuple(pixels[5, 7]) == colour(2, 2)


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    dump(folder / "meta", {b"fine_label_names": [b"apple", b"aquarium_fish"], b"coarse_label_names": [b"fruit"]})
    dump(folder / "train", {b"fine_labels": [1, 0, 1], b"coarse_labels": [0, 0, 0], b"data": cifar_rows([1, 0, 1])})
    dump(folder / "test", {b"fine_labels": [0, 1], b"coarse_labels": [0, 0], b"data": cifar_rows([0, 1])})
    data = load_dataset("cifar100", tmp_path)
    assert data.class_names == ["apple", "aquarium_fish"]
    assert data.train.labels.tolist() == [1, 0, 1]
    assert_colour(data.test.image(1), colour(1, 1))


def test_cifar_missing_key_and_missing_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    dump(folder / "meta", {b"fine_label_names": [b"apple"]})
    dump(folder / "train", {b"labels": [0], b"data": cifar_rows([0])})
    with pytest.raises(DatasetError, match=r"cifar-100-python/train.*'fine_labels'"):
        load_dataset("cifar100", tmp_path)
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------------------------------------
# DomainNet and Office-Caltech10 with FedBN's split pickles


def make_fedbn(
    root: Path, folder: str, domains: tuple[str, ...], classes: tuple[str, ...], relative_to_root: bool = True
) -> None:
    """Per domain and split, images of every class and FedBN's (paths, class names) pickle."""
    chosen = list(reversed(classes))  # entries deliberately not in sorted class order
    for d, domain in enumerate(domains):
        for split, n in (("train", 2), ("test", 1)):
            paths, names = [], []
            for c in chosen:
                for i in range(n):
                    rel = f"{domain}/{c}/{domain}_{split}_{i}.jpg"
                    write_image(root / folder / rel, colour(classes.index(c), d))
                    paths.append(f"{folder}/{rel}" if relative_to_root else rel)
                    names.append(c)
            dump(root / folder / f"{domain}_{split}.pkl", (np.array(paths), np.array(names)))


@pytest.mark.parametrize(
    "name,folder,domains,classes",
    [
        ("domainnet", "DomainNet", DOMAINNET_DOMAINS, DOMAINNET_CLASSES),
        ("office_caltech10", "office_caltech_10", OFFICE_DOMAINS, OFFICE_CLASSES),
    ],
)
@pytest.mark.parametrize("relative_to_root", [True, False])
def test_fedbn_datasets(
    tmp_path: Path, name: str, folder: str, domains: tuple, classes: tuple, relative_to_root: bool
) -> None:
    make_fedbn(tmp_path, folder, domains, classes, relative_to_root)
    data = load_dataset(name, tmp_path)
    assert data.class_names == sorted(classes) == list(classes)
    for source, n in ((data.train, 2), (data.test, 1)):
        assert isinstance(source, FileImageSource) and source.domains is not None
        assert len(source) == len(domains) * 10 * n
        assert source.domains is not None and source.domains.tolist() == [d for d in domains for _ in range(10 * n)]
        for i in range(len(source)):
            # Path, label and domain of one index describe the same image.
            path = source.path(i)
            assert path.parts[-3] == source.domains[i]
            assert path.parts[-2] == source.class_names[source.labels[i]]
            assert_colour(source.image(i), colour(int(source.labels[i]), domains.index(source.domains[i])))
    sub = load_dataset(name, tmp_path, domains=[domains[1]])
    assert sub.train.domains is not None and set(sub.train.domains.tolist()) == {domains[1]}
    assert sub.class_names == list(classes)


def test_fedbn_errors(tmp_path: Path) -> None:
    make_fedbn(tmp_path, "DomainNet", DOMAINNET_DOMAINS, DOMAINNET_CLASSES)
    with pytest.raises(DatasetError, match="domains=.*'paint'"):
        load_dataset("domainnet", tmp_path, domains=["paint"])
    pkl = tmp_path / "DomainNet" / "sketch_test.pkl"
    dump(pkl, (np.array(["DomainNet/sketch/bird/x.jpg"]), np.array(["dog"])))
    with pytest.raises(DatasetError, match=r"sketch_test\.pkl.*'dog'"):
        load_dataset("domainnet", tmp_path)
    dump(pkl, (np.array([b"DomainNet/sketch/bird/x.jpg"]), np.array([b"dog"])))  # Python 2 byte strings
    with pytest.raises(DatasetError, match=r"sketch_test\.pkl.*\['dog'\]"):
        load_dataset("domainnet", tmp_path)
    dump(pkl, {"paths": [], "labels": []})
    with pytest.raises(DatasetError, match=r"sketch_test\.pkl.*pair"):
        load_dataset("domainnet", tmp_path)
    dump(pkl, (np.array(["elsewhere/bird/x.jpg"]), np.array(["bird"])))
    with pytest.raises(DatasetError, match=r"sketch_test\.pkl.*elsewhere/bird/x\.jpg"):
        load_dataset("domainnet", tmp_path)
    pkl.write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=r"sketch_test\.pkl"):
        load_dataset("domainnet", tmp_path)
    pkl.unlink()
    with pytest.raises(DatasetError, match=r"sketch_test\.pkl"):
        load_dataset("domainnet", tmp_path)


# ---------------------------------------------------------------------------------------------
# Generic image folders


def test_imagefolder_presplit(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for label, cname in enumerate(["golden_retriever", "tabby_cat"]):
            for i, ext in enumerate([".jpg", ".png", ".jpeg", ".bmp", ".webp"]):
                write_image(tmp_path / split / cname / f"img{i}{ext}", colour(label, i))
    (tmp_path / "train" / "tabby_cat" / "notes.txt").write_text("not an image")
    data = load_dataset("imagefolder", tmp_path)
    assert data.class_names == ["golden_retriever", "tabby_cat"]  # underscores kept
    assert len(data.train) == len(data.test) == 10 and data.val is None
    assert data.train.labels.tolist() == [0] * 5 + [1] * 5
    for i in range(10):
        assert_colour(data.train.image(i), colour(i // 5, i % 5))


def test_imagefolder_seeded_split(tmp_path: Path) -> None:
    for label, cname in enumerate(["b_class", "a_class", "c_class"]):
        for i in range(10):
            write_image(tmp_path / cname / f"{i:02d}.png", colour(label, i))
    a = load_dataset("imagefolder", tmp_path, test_fraction=0.3, val_fraction=0.1, seed=1)
    b = load_dataset("imagefolder", tmp_path, test_fraction=0.3, val_fraction=0.1, seed=1)
    c = load_dataset("imagefolder", tmp_path, test_fraction=0.3, val_fraction=0.1, seed=2)
    assert a.class_names == ["a_class", "b_class", "c_class"]
    assert (
        isinstance(a.train, FileImageSource)
        and isinstance(a.test, FileImageSource)
        and isinstance(a.val, FileImageSource)
    )
    assert np.bincount(a.test.labels).tolist() == [3, 3, 3] and np.bincount(a.val.labels).tolist() == [1, 1, 1]
    assert len(a.train) == 18
    assert a.test.paths == b.test.paths != c.test.paths  # type: ignore[attr-defined]
    assert not set(a.train.paths) & set(a.test.paths)
    for i in range(len(a.test)):
        assert a.test.path(i).parent.name == a.class_names[a.test.labels[i]]


def test_imagefolder_errors(tmp_path: Path) -> None:
    write_image(tmp_path / "cat" / "0.png", colour(0, 0))
    write_image(tmp_path / "dog" / "0.png", colour(1, 0))
    write_image(tmp_path / "dog" / "1.png", colour(1, 1))
    with pytest.raises(DatasetError, match=r"cat: 1 image"):
        load_dataset("imagefolder", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: class folder holds no images"):
        load_dataset("imagefolder", tmp_path)
    with pytest.raises(ValueError, match="test_fraction=1.5"):
        load_dataset("imagefolder", tmp_path, test_fraction=1.5)


# ---------------------------------------------------------------------------------------------
# Registry and bad inputs


def test_registry_names_and_shapes() -> None:
    assert set(DATASET_NAMES) == {
        "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397", "dtd",
        "eurosat", "ucf101", "imagenet", "cifar10", "cifar100", "domainnet", "office_caltech10", "imagefolder", "shapes",
    }  # fmt: skip
    shapes = load_dataset("Shapes", train_per_class=1, test_per_class=1)
    assert len(shapes.class_names) == 48 and len(shapes.train) == 48
    assert "skip_corrupt" in dataset_options("dtd") and "domains" in dataset_options("domainnet")


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(DatasetError, match=r"'mnist'.*caltech101.*office_caltech10"):
        load_dataset("mnist", "/tmp")


def test_unknown_option_lists_accepted(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"\['shots'\].*skip_corrupt"):
        load_dataset("dtd", tmp_path, shots=16)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "nope"))):
        load_dataset("dtd", tmp_path / "nope")
    with pytest.raises(DatasetError, match="needs a data directory"):
        load_dataset("dtd", "")
    with pytest.raises(DatasetError, match=r"caltech-101"):
        load_dataset("caltech101", tmp_path)


def test_missing_split_file(tmp_path: Path) -> None:
    make_coop(tmp_path, "dtd")
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").unlink()
    with pytest.raises(DatasetError, match=r"dtd/split_zhou_DescribableTextures\.json"):
        load_dataset("dtd", tmp_path)


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps([1, 2]), "expected a JSON object"),
        (json.dumps({"train": [], "test": []}), "missing key 'val'"),
        (json.dumps({"train": {}, "val": [], "test": []}), "'train' must be a list"),
        (json.dumps({"train": [["a.jpg", 0]], "val": [], "test": []}), r"train\[0\]"),
        (json.dumps({"train": [["a.jpg", "0", "x"]], "val": [], "test": []}), r"train\[0\]"),
        (json.dumps({"train": [["a.jpg", -1, "x"]], "val": [], "test": []}), r"train\[0\]"),
        (json.dumps({"train": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]], "val": [], "test": []}), "named both"),
        (
            json.dumps({"train": [["a.jpg", 0, "x"], ["b.jpg", 2, "z"]], "val": [], "test": [["c.jpg", 0, "x"]]}),
            r"label\(s\) \[1\]",
        ),
    ],
)
def test_malformed_split_file(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(content)
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset("dtd", tmp_path)
    assert "split_zhou_DescribableTextures.json" in str(info.value)


def test_class_with_no_test_images(tmp_path: Path) -> None:
    make_coop(tmp_path, "food101")
    split_path = tmp_path / "food-101" / "split_zhou_Food101.json"
    split = json.loads(split_path.read_text())
    split["test"] = [e for e in split["test"] if e[1] != 1]
    split_path.write_text(json.dumps(split))
    with pytest.raises(DatasetError, match=r"split_zhou_Food101\.json \(test\).*'cls b' \(label 1\)"):
        load_dataset("food101", tmp_path)


def test_corrupt_and_missing_image_name_the_path(tmp_path: Path) -> None:
    make_coop(tmp_path, "dtd")
    data = load_dataset("dtd", tmp_path)
    assert isinstance(data.train, FileImageSource)
    bad = data.train.path(0)
    bad.write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    with pytest.raises(DatasetError, match=re.escape(f"cannot read image {bad}")):
        data.train.image(0)
    truncated = data.train.path(1)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(DatasetError, match=re.escape(str(truncated))):
        data.train.image(1)
    missing = data.train.path(2)
    missing.unlink()
    with pytest.raises(DatasetError, match=re.escape(str(missing))):
        data.train.image(2)


def test_skip_corrupt_reports_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, split = make_coop(tmp_path, "dtd")
    (tmp_path / "dtd" / "images" / split["train"][1][0]).write_bytes(b"garbage")
    (tmp_path / "dtd" / "images" / split["train"][4][0]).unlink()
    with caplog.at_level(logging.WARNING, logger=files_module.__name__):
        data = load_dataset("dtd", tmp_path, skip_corrupt=True)
    assert isinstance(data.train, FileImageSource)
    assert len(data.train) == 4 and len(data.train.skipped) == 2
    assert "skipped 2 unreadable image(s) of 6" in caplog.text
    kept = [e for k, e in enumerate(split["train"]) if k not in (1, 4)]
    assert data.train.labels.tolist() == [e[1] for e in kept]
    assert [data.train.path(i).name for i in range(4)] == [Path(e[0]).name for e in kept]
    # The standalone call reports the count too.
    source = FileImageSource([data.train.path(0), tmp_path / "gone.png"], [0, 1], ["a", "b"])
    assert source.drop_unreadable() == 1 and len(source) == 1


def test_skip_corrupt_that_empties_a_class_raises(tmp_path: Path) -> None:
    _, split = make_coop(tmp_path, "dtd")
    for entry in split["train"]:
        if entry[1] == 0:
            (tmp_path / "dtd" / "images" / entry[0]).unlink()
    with pytest.raises(DatasetError, match=r"\(train\).*'cls_a' \(label 0\)"):
        load_dataset("dtd", tmp_path, skip_corrupt=True)


# ---------------------------------------------------------------------------------------------
# Laziness: building a source decodes nothing; image(i) opens exactly file i


def test_building_sources_decodes_no_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_coop(tmp_path, "oxford_flowers")
    make_imagenet(tmp_path)
    make_fedbn(tmp_path, "office_caltech_10", OFFICE_DOMAINS, OFFICE_CLASSES)
    opened: list[Path] = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(Path(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    sources: list[ImageSource] = []
    for name in ("oxford_flowers", "imagenet", "office_caltech10"):
        data = load_dataset(name, tmp_path)
        sources += [data.train, data.test]
    assert opened == []
    source = sources[-1]
    assert isinstance(source, FileImageSource)
    source.image(3)
    assert opened == [source.path(3)]
