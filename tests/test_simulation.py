"""End to end: `flwr run .` in the local simulation, offline, with the real Flower runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.config import RunConfig
from common.methods import METHODS
from common.model.roles import Role
from tests.conftest import pyproject_run_config
from tests.local_superlink import flwr_run, flwr_run_in, stop_processes_under


def test_flwr_run_three_clients_two_rounds(flwr_home: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = f"num-server-rounds=2 local-epochs=1 shots=4 test-per-class=2 output-dir='{runs}' state-dir='{tmp_path / 'state'}'"
    result = flwr_run(flwr_home, config, supernodes=3, timeout=540)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "[pfedmma] round 2/2" in output, output[-4000:]

    (run_dir,) = runs.iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["valid-replies"] == 3 and row["rejected-replies"] == 0
        assert set(row["per-client"]) == {"0", "1", "2"}
        assert all(set(m) == {"local", "base", "base-other", "novel"} for m in row["per-client"].values())
        # Base = own classes (Local) and other clients' classes in proportion 1 : 2 (3 clients); Local is
        # a separate pass over the own-class images, so allow one of the 48 images to differ.
        for m in row["per-client"].values():
            assert abs(m["base"] - (m["local"] + 2 * m["base-other"]) / 3) <= 1 / 48 + 1e-9
        assert {"local", "base", "novel", "hm3", "hm2"} <= set(row["evaluation"])
        assert row["bytes-received"] > 0 and row["train-loss"] > 0
        # Where each client ran: a GPU where this machine has one (the test gives clients a share), else the CPU.
        assert set(row["device"]) == {"0", "1", "2"}
        expected = "cuda" if torch.cuda.is_available() else "cpu"
        assert {d["type"] for d in row["device"].values()} == {expected}, row["device"]
        assert {d["dtype"] for d in row["device"].values()} <= {"fp32", "bf16", "fp16"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds-completed"] == 2 and summary["selected-round"] == 2
    assert set(summary["device"]) == {"0", "1", "2"} and all("peak-memory-mb" in d for d in summary["device"].values())
    assert summary["evaluation"] == rows[-1]["evaluation"]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert set(evaluation["per-client"]) == {"0", "1", "2"}
    assert "| **mean** |" in (run_dir / "evaluation.md").read_text()
    assert (run_dir / "evaluation.csv").read_text().splitlines()[0] == "client,local,base,novel,base-other,hm3,hm2,in-mean"
    partition = json.loads((run_dir / "partition.json").read_text())
    assert partition["scheme"] == "base-to-novel" and len(partition["clients"]) == 3
    assert "HM3" in output and "partition (base-to-novel" in output
    config_json = json.loads((run_dir / "config.json").read_text())
    assert config_json["num-server-rounds"] == 2
    states = sorted(p.name for p in (run_dir / "global").iterdir())
    assert states == ["round-000.safetensors", "round-001.safetensors", "round-002.safetensors"]
    first, last = load_file(run_dir / "global" / states[0]), load_file(run_dir / "global" / states[-1])
    assert set(first) == set(last) and all(k.startswith("mma.shared.") for k in first)
    assert any(not (first[k] == last[k]).all() for k in first)  # the global state moved
    # Each client kept its private adapters on its own disk, outside the run directory.
    private_files = sorted(p.name for p in (tmp_path / "state").rglob("*.safetensors"))
    assert private_files == ["client-0.safetensors", "client-1.safetensors", "client-2.safetensors"]


@pytest.fixture(scope="module")
def shared_flwr_home(tmp_path_factory: pytest.TempPathFactory):
    """One FLWR_HOME (and so one local SuperLink) for every method's run in this module."""
    home = tmp_path_factory.mktemp("flwr-home-methods")
    yield home
    stop_processes_under(home)


# pFedMoAP's strategy (per-client experts) runs in the default suite (pfedmma's run is the test
# above; zeroshot's evaluate-only strategy runs there in tests/test_compare.py); the others, which
# differ from pfedmma only by module and role table (covered by the unit tests), run with
# `pytest -m slow`, which keeps the default suite within CI's time.
DEFAULT_SUITE = ("pfedmoap",)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in DEFAULT_SUITE else pytest.mark.slow) for n in METHODS]
)
def test_flwr_run_every_method_two_rounds(shared_flwr_home: Path, tmp_path: Path, name: str) -> None:
    runs, state = tmp_path / "runs", tmp_path / "state"
    config = (
        f"method='{name}' num-server-rounds=2 local-epochs=1 shots=4 test-per-class=2 eval-every=0 "
        f"output-dir='{runs}' state-dir='{state}'"
    )
    result = flwr_run_in(shared_flwr_home, config, supernodes=2, timeout=540)
    output = result.stdout + result.stderr
    method = METHODS[name](RunConfig.from_flower({**pyproject_run_config(), "method": name}))
    rounds = 2 if method.trains else 1  # zero-shot evaluates once
    assert result.returncode == 0, output[-4000:]
    assert f"[pfedmma] round {rounds}/{rounds}" in output, output[-4000:]

    (run_dir,) = runs.iterdir()
    initial = method.initial_state()
    shared_floats = sum(t.numel() for t in initial[Role.SHARED].values())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for row in rows:
        assert row["method"] == name and row["rejected-replies"] == 0
        assert row["valid-replies"] == (2 if method.trains else 0)
        assert set(row["communication"]) == {"0", "1"}
        for traffic in row["communication"].values():
            assert traffic["floats-up"] == (shared_floats if method.trains else 0)
            assert traffic["floats-down"] >= (2 if method.trains else 1) * shared_floats
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["round"] == rounds and set(evaluation["per-client"]) == {"0", "1"}
    assert {"local", "base", "novel", "hm3", "hm2"} <= set(evaluation["summary"])
    record = json.loads((run_dir / "method.json").read_text())
    assert record["method"] == name
    assert record["parameters"]["shared"] == shared_floats
    assert set(record["tensors"]["private"]) == set(initial[Role.PRIVATE])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == name and summary["rounds-completed"] == rounds
    assert summary["communication"]["floats-up-per-client-round"] == (shared_floats if method.trains else 0)
    final = load_file(run_dir / "global" / f"round-{rounds:03d}.safetensors")
    assert set(final) == set(initial[Role.SHARED])
    private_files = sorted(p.name for p in state.rglob("*.safetensors"))
    assert private_files == (["client-0.safetensors", "client-1.safetensors"] if initial[Role.PRIVATE] else [])
