"""Client shards built from the run config, for every partition scheme."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import RunConfig
from common.data.federated import client_data
from tests.conftest import pyproject_run_config

MEAN = STD = (0.5, 0.5, 0.5)


def _cfg(**overrides) -> RunConfig:
    return RunConfig.from_flower({**pyproject_run_config(), "test-per-class": 2, **overrides})


def test_base_to_novel_shards() -> None:
    cfg = _cfg(shots=3)
    shards = [client_data(cfg, i, 4, 32, MEAN, STD) for i in range(4)]
    base_names = shards[0].class_names
    assert len(base_names) == 24 and all(s.class_names == base_names for s in shards)
    own = [{int(s.train.source.labels[i]) for i in s.train.indices} for s in shards]
    assert all(len(o) == 6 for o in own) and not set.intersection(*own)
    for shard, classes in zip(shards, own):
        assert len(shard.train) == 3 * 6
        local = shard.evals["local"].dataset
        assert {int(local.source.labels[i]) for i in local.indices} == classes
        assert len(shard.evals["base"].dataset) == 24 * 2
        assert shard.evals["novel"].class_names == [n for n in shard.evals["novel"].class_names]
        assert len(shard.evals["novel"].class_names) == 24
        assert not set(shard.evals["novel"].class_names) & set(base_names)
        image, label = shard.evals["novel"].dataset[0]
        assert image.shape == (3, 32, 32) and 0 <= label < 24


def test_dirichlet_shards_cover_the_training_set() -> None:
    cfg = _cfg(partition="dirichlet", shots=0, **{"dirichlet-beta": 0.3})
    shards = [client_data(cfg, i, 3, 32, MEAN, STD) for i in range(3)]
    all_train = sorted(i for s in shards for i in s.train.indices)
    assert all_train == list(range(len(shards[0].train.source)))
    assert all(set(s.evals) == {"local"} and len(s.class_names) == 48 for s in shards)


def test_domain_shards_and_validation_split() -> None:
    cfg = _cfg(partition="domain", shots=0, **{"dataset-domains": "solid,outline", "model-selection": "val"})
    shards = [client_data(cfg, i, 4, 32, MEAN, STD) for i in range(4)]
    assert [s.domain for s in shards] == ["solid", "solid", "outline", "outline"]
    for shard in shards:
        val = shard.evals["val"].dataset
        assert len(val) > 0
        assert set(np.asarray(val.source.domains)[val.indices]) == {shard.domain}


def test_bad_partition_values_are_named() -> None:
    with pytest.raises(ValueError, match="num-partitions=30 exceeds the 24 base classes"):
        client_data(_cfg(), 0, 30, 32, MEAN, STD)
