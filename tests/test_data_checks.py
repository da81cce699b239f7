"""The cheap file check of a client's shard (common/data/checks.py) on CoOp-layout fixtures."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import RunConfig
from common.data import checks
from common.data.base import ClientData, LabeledDataset
from common.data.checks import check_client_data, check_dataset, file_problem
from common.data.federated import client_data
from common.data.files import DatasetError, FileImageSource, open_rgb
from common.data.shapes import ShapesSource
from tests.conftest import pyproject_run_config
from tests.test_datasets import make_coop, write_image

MEAN = STD = (0.5, 0.5, 0.5)


def identity(image: Image.Image) -> Image.Image:
    return image


def dtd_shard(root: Path) -> tuple[ClientData, dict[str, int]]:
    """Client 0 of 2 on a 3-class DTD in CoOp's layout (base-to-novel: one own class, 4 shots),
    and the split file's label of every image, by file path."""
    _, split = make_coop(root, "dtd", per_split={"train": 4, "val": 1, "test": 3})
    cfg = RunConfig.from_flower(
        {**pyproject_run_config(), "dataset": "dtd", "data-dir": str(root), "shots": 4, "partition": "base-to-novel"}
    )
    images = root / "dtd" / "images"
    label_of = {str(images / rel): label for entries in split.values() for rel, label, _ in entries}
    return client_data(cfg, 0, 2, 32, MEAN, STD), label_of


def path_of(dataset: LabeledDataset, i: int) -> Path:
    assert isinstance(dataset.source, FileImageSource)
    return dataset.source.path(dataset.indices[i])


def test_missing_and_corrupt_files_stop_the_client_naming_both(tmp_path: Path) -> None:
    data, _ = dtd_shard(tmp_path)
    missing, corrupt = path_of(data.train, 0), path_of(data.train, 1)
    missing.unlink()
    corrupt.write_bytes(b"\x00garbage, not an image at all")
    with pytest.raises(DatasetError) as err:
        check_client_data(data, skip=False)
    message = str(err.value)
    assert message.startswith("2 of ")
    assert f"{missing} (file does not exist)" in message
    assert f"{corrupt} (not an image PIL can identify" in message
    assert "skip-corrupt = true" in message


def test_skip_leaves_bad_files_out_and_keeps_labels_aligned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, label_of = dtd_shard(tmp_path)
    before = [path_of(data.train, i) for i in range(len(data.train))]
    missing, corrupt = before[0], before[1]
    missing.unlink()
    corrupt.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger=checks.__name__):
        result = check_client_data(data, skip=True)
    train = result.data.train
    assert result.skipped == {"train": 2, "local": 0, "base": 0, "novel": 0}
    assert set(result.skipped_files) == {str(missing), str(corrupt)}
    assert "left out 2 of" in caplog.text
    assert [path_of(train, i) for i in range(len(train))] == before[2:]
    for i in range(len(train)):
        # The classifier label is the split file's label through the same label map.
        assert train.label(i) == data.train.label(i + 2)
        assert int(train.source.labels[train.indices[i]]) == label_of[str(path_of(train, i))]
        assert train.item(i, torch.Generator().manual_seed(0))[0].shape == (3, 32, 32)
    assert (train.source, train.transform, train.label_map) == (
        data.train.source, data.train.transform, data.train.label_map,
    )
    assert all(result.data.evals[k].dataset is data.evals[k].dataset for k in data.evals)
    assert result.data.class_names == data.class_names and result.data.own_classes == data.own_classes


def test_a_test_file_in_two_eval_sets_is_counted_once(tmp_path: Path) -> None:
    data, _ = dtd_shard(tmp_path)
    bad = path_of(data.evals["local"].dataset, 0)  # the client's local test images are base images too
    bad.unlink()
    result = check_client_data(data, skip=True)
    assert result.skipped == {"train": 0, "local": 1, "base": 1, "novel": 0}
    assert result.skipped_files == (str(bad),)
    assert len(result.data.evals["base"].dataset) == len(data.evals["base"].dataset) - 1


def test_clean_shard_and_in_memory_sources_pass_unchanged(tmp_path: Path) -> None:
    data, _ = dtd_shard(tmp_path)
    result = check_client_data(data, skip=False)
    assert result.data is data and result.skipped_files == ()
    shapes = LabeledDataset(ShapesSource("train", 2), range(10), identity)
    assert check_dataset(shapes, skip=False) == checks.ShardCheck(shapes, ())


def files_dataset(root: Path, names: list[str]) -> LabeledDataset:
    source = FileImageSource(names, np.zeros(len(names), dtype=np.int64), ["a"], root=root)
    return LabeledDataset(source, range(len(names)), identity)


def test_long_lists_are_cut_and_an_emptied_set_is_an_error(tmp_path: Path) -> None:
    names = [f"gone_{k:02d}.png" for k in range(12)]
    with pytest.raises(DatasetError, match=r"12 of 12 .*: ([^;]*; ){10}and 2 more\. .*skip-corrupt = true"):
        check_dataset(files_dataset(tmp_path, names), skip=False)
    with pytest.raises(DatasetError, match="every one of the 12 image.*would leave it empty"):
        check_dataset(files_dataset(tmp_path, names), skip=True)


def test_check_dataset_skip_returns_the_rest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_image(tmp_path / "good.png", (10, 20, 30))
    with caplog.at_level(logging.WARNING, logger=checks.__name__):
        result = check_dataset(files_dataset(tmp_path, ["gone.jpg", "good.png"]), skip=True, where="the test set")
    assert result.skipped == (str(tmp_path / "gone.jpg"),) and result.dataset.indices == [1]
    assert "left out 1 of 2 image(s) of the test set" in caplog.text


def test_truncated_pixels_pass_the_check_and_fail_at_decode_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "truncated.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    assert file_problem(path) is None  # the header (format, size) is intact
    with pytest.raises(DatasetError, match=re.escape(f"cannot read image {path}")):
        open_rgb(path)

