"""Run and node configuration: defaults, and errors that name the key, the value and the rule."""

from __future__ import annotations

import pytest

from common.config import ConfigError, NodeConfig, RunConfig
from tests.conftest import pyproject_run_config


def test_pyproject_defaults_validate_and_cover_every_key() -> None:
    defaults = pyproject_run_config()
    cfg = RunConfig.from_flower(defaults)
    assert set(defaults) == set(cfg.to_flower())  # pyproject lists every option, nothing else
    assert cfg.model_name == defaults["model-name"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"learning-rate": -0.1}, "learning-rate=-0.1 is invalid"),
        ({"amp": "false"}, "amp='false' is invalid"),  # strings are not booleans (docs/paper.md §6.5)
        ({"local-epochs": 0}, "local-epochs=0 is invalid"),
        ({"fraction-train": 1.5}, "fraction-train=1.5 is invalid"),
        ({"dataset": "mnist"}, "dataset='mnist' is invalid"),
        ({"adapter-start": 4, "adapter-end": 2}, "adapter-end=2 is below adapter-start=4"),
        ({"learnin-rate": 0.1}, "unknown key 'learnin-rate'; valid keys: adapter-alpha"),
        (
            {"method": "fedprox"},
            "method='fedprox' is invalid: unknown method; valid: pfedmma, zeroshot, local, fedavg-mma, promptfl, fedpgp, pfedmoap",
        ),
        ({"pfedmoap-selection": "closest"}, "pfedmoap-selection='closest' is invalid: Input should be 'nearest' or 'random'"),
        ({"pfedmoap-gate-dropout": 1.0}, "pfedmoap-gate-dropout=1.0 is invalid"),
        ({"fedpgp-rank": 0}, "fedpgp-rank=0 is invalid"),
    ],
)
def test_bad_values_are_named(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_flower({**pyproject_run_config(), **override})


def test_node_config_partition_checks() -> None:
    node = NodeConfig.from_flower({"partition-id": 1, "num-partitions": 3})
    assert (node.partition_id, node.num_partitions) == (1, 3)
    with pytest.raises(ConfigError, match="partition-id=3 must be below num-partitions=3"):
        NodeConfig.from_flower({"partition-id": 3, "num-partitions": 3})
    with pytest.raises(ConfigError, match="required key 'partition-id' is missing"):
        NodeConfig.from_flower({})
