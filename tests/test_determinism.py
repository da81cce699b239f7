"""Same config and seed, same numbers: every draw comes from a generator seeded by (seed,
client, round), never from a global RNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data.base import LabeledDataset, SeededAugmentation
from common.data.shapes import ShapesSource
from common.seeds import sub_seed
from common.transforms import SeededTrainTransform, crop_box, train_transform
from tests.local_superlink import flwr_run_in, stop_processes_under

STATS = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _client_view(partition_id: int) -> LabeledDataset:
    source = ShapesSource("train", per_class=1, styles=("striped",), seed=0)
    indices = list(range(partition_id * 6, partition_id * 6 + 6))
    return LabeledDataset(source, indices, train_transform(32, *STATS, scale_min=0.5))


def _augmented(partition_id: int, server_round: int, epoch: int = 0) -> torch.Tensor:
    dataset = SeededAugmentation(_client_view(partition_id), sub_seed(7, partition_id, server_round, 2))
    dataset.set_epoch(epoch)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_a_clients_augmentations_do_not_depend_on_which_client_ran_first() -> None:
    torch.manual_seed(0)
    a_first = _augmented(0, 1)
    b_second = _augmented(1, 1)
    torch.manual_seed(123)  # a different global state, and the other order
    torch.rand(1000)
    b_first = _augmented(1, 1)
    a_second = _augmented(0, 1)
    assert torch.equal(a_first, a_second) and torch.equal(b_first, b_second)
    # ... and they are real augmentations: they change with the round and the epoch.
    assert not torch.equal(a_first, _augmented(0, 2))
    assert not torch.equal(a_first, _augmented(0, 1, epoch=1))


def test_augmentation_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _augmented(0, 1)
    assert torch.equal(torch.rand(3), expected)


def test_the_training_transform_refuses_to_draw_from_the_global_rng() -> None:
    transform = SeededTrainTransform(32, *STATS)
    with pytest.raises(ValueError, match="seeded generator"):
        transform(Image.new("RGB", (32, 32)))


def test_crop_boxes_respect_the_scale_range_and_the_image() -> None:
    generator = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(500):
        top, left, h, w = crop_box(40, 40, (0.5, 1.0), generator)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 40
        areas.append(h * w / 1600)
    # Rounding moves an area by a pixel row at most; most boxes are well inside the range.
    assert min(areas) > 0.45 and max(areas) <= 1.0 and np.std(areas) > 0.05


def test_client_means_do_not_depend_on_the_order_replies_arrived_in() -> None:
    from common.metrics import summarize

    # (0.1 + 0.2) + 0.3 != (0.3 + 0.2) + 0.1 in floating point: order must be fixed.
    values = {0: 0.1, 1: 0.2, 2: 0.3}
    arrived = [{c: {"local": values[c]} for c in order} for order in ((0, 1, 2), (2, 1, 0), (1, 2, 0))]
    means = [summarize(rows)["local"] for rows in arrived]
    assert means[0] == means[1] == means[2]


def _numbers(run_dir: Path) -> list[dict]:
    """metrics.jsonl without what measures time, not learning."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds")
    return rows


@pytest.fixture(scope="module")
def flwr_home(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("flwr-home-determinism")
    yield home
    stop_processes_under(home)


def test_the_same_simulation_twice_gives_bit_identical_metrics(flwr_home: Path, tmp_path: Path) -> None:
    run_dirs = []
    for attempt in ("first", "second"):
        runs = tmp_path / attempt
        config = (
            f"num-server-rounds=2 local-epochs=1 shots=4 test-per-class=2 seed=3 "
            f"output-dir='{runs}' state-dir='{tmp_path / attempt / 'state'}'"
        )
        result = flwr_run_in(flwr_home, config, supernodes=2, timeout=540)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        (run_dir,) = [p for p in runs.iterdir() if p.name != "state"]
        run_dirs.append(run_dir)
    first, second = (_numbers(d) for d in run_dirs)
    assert first == second  # every loss, accuracy, count and byte, compared exactly
    assert first[-1]["evaluation"]["local"] > 0 and first[-1]["train-loss"] > 0
