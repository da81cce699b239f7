"""Shared fixtures: a tiny random-init CLIP config and Flower run configs built from pyproject."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from common.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA: on a machine without one they are skipped, saying so."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (pytest -m gpu on a GPU machine; scripts/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pyproject_run_config() -> dict[str, Any]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


@pytest.fixture
def run_config(tmp_path: Path) -> dict[str, Any]:
    """The app's default run config, made small and pointed at temp dirs."""
    return {
        **pyproject_run_config(),
        "model-name": "pfedmma-tiny",
        "pretrained": "",
        "shots": 4,
        "test-per-class": 2,
        "batch-size": 16,
        "state-dir": str(tmp_path / "state"),
        "output-dir": str(tmp_path / "runs"),
    }


@pytest.fixture
def tiny_cfg(run_config: dict[str, Any]) -> RunConfig:
    return RunConfig.from_flower(run_config)


@pytest.fixture
def flwr_home(tmp_path: Path):
    """A private FLWR_HOME; the local SuperLink that `flwr run` starts there is stopped afterwards."""
    from tests.local_superlink import stop_processes_under

    home = tmp_path / "flwr-home"
    home.mkdir()
    yield home
    stop_processes_under(home)


class Nodes:
    """Just enough of a Grid for sampling: three connected nodes."""

    def get_node_ids(self) -> list[int]:
        return [11, 12, 13]


@pytest.fixture
def server_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ServerApp process has set when the strategy builds instruction messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
