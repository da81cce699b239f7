"""Shared fixtures: a tiny random-init CLIP config and Flower run configs built from pyproject."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import tomllib

from common.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


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
