"""End to end: `flwr run .` in the local simulation, offline, with the real Flower runtime."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from tests.local_superlink import flwr_run


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
        assert all(set(m) == {"local", "base", "novel"} for m in row["per-client"].values())
        assert {"local", "base", "novel", "hm3", "hm2"} <= set(row["evaluation"])
        assert row["bytes-received"] > 0 and row["train-loss"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds-completed"] == 2 and summary["selected-round"] == 2
    assert summary["evaluation"] == rows[-1]["evaluation"]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert set(evaluation["per-client"]) == {"0", "1", "2"}
    assert "| **mean** |" in (run_dir / "evaluation.md").read_text()
    assert (run_dir / "evaluation.csv").read_text().splitlines()[0] == "client,local,base,novel,hm3,hm2"
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
