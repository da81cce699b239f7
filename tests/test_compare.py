"""The compare command: plan, skip what is done, aggregate over seeds, write tables and plots."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from server.compare.plan import PlanError, plan_runs
from server.compare.plots import plot_curves, plot_tradeoff
from server.compare.results import MethodResult, SeedResult, markdown, write_tables
from server.compare.runner import Target, _toml_value
from tests.conftest import REPO
from tests.local_superlink import flower_env, stop_processes_under

PNG = b"\x89PNG\r\n\x1a\n"


def _fake_run(root: Path, seed: int, local: float, novel: float) -> Path:
    """A run directory with just the files the compare command reads."""
    run = root / f"run-{seed}"
    run.mkdir(parents=True)
    evaluation = {"local": local, "base": 0.5, "novel": novel}
    evaluation["hm3"] = 3 / (1 / local + 1 / 0.5 + 1 / novel)
    (run / "summary.json").write_text(json.dumps({
        "evaluation": evaluation,
        "communication": {"floats-up-per-client-round": 100.0, "floats-down-per-client-round": 250.0},
    }))
    (run / "method.json").write_text(json.dumps({"parameters": {"trainable-per-client": 1234}}))
    (run / "evaluation.json").write_text(json.dumps({"per-client": {"0": {}, "1": {}}}))
    rows = [{"round": r, "full-eval": True, "evaluation": {**evaluation, "local": local * r / 2}} for r in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_method_results_are_means_and_sample_stds_over_seeds(tmp_path: Path) -> None:
    seeds = [SeedResult.read(s, _fake_run(tmp_path, s, local, 0.6), 10.0 * (s + 1)) for s, local in enumerate((0.7, 0.8, 0.9))]
    result = MethodResult("pfedmma", seeds)
    mean, std = result.mean_std("local")
    assert mean == pytest.approx(0.8) and std == pytest.approx(statistics.stdev([0.7, 0.8, 0.9]))
    assert result.mean_std("base-other") is None  # not reported by these runs
    assert result.cost("wall_seconds") == pytest.approx(20.0)
    row = next(line for line in markdown([result]).splitlines() if line.startswith("| pfedmma"))
    assert "| 80.00 ± 10.00 |" in row and "| 1,234 | 100 | 250 | 20 |" in row

    paths = write_tables([result], tmp_path / "out", {"preset": "x"})
    with open(paths["csv"]) as f:
        (line,) = list(csv.DictReader(f))
    assert float(line["local-mean"]) == pytest.approx(0.8) and line["seeds"] == "3"
    saved = json.loads(paths["json"].read_text())["methods"][0]
    assert saved["metrics"]["novel"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.0), "n": 3}
    for plot in (plot_curves([result], tmp_path / "c.png"), plot_tradeoff([result], tmp_path / "t.png")):
        assert plot.read_bytes().startswith(PNG) and plot.stat().st_size > 10_000


def test_the_plan_validates_every_run_before_starting_any(tmp_path: Path) -> None:
    runs = plan_runs(tmp_path, {"num-server-rounds": 2}, ["pfedmma", "zeroshot"], [0, 1], {"shots": 4})
    assert [(r.method, r.seed) for r in runs] == [("pfedmma", 0), ("pfedmma", 1), ("zeroshot", 0), ("zeroshot", 1)]
    assert runs[1].run_config == {"num-server-rounds": 2, "shots": 4, "method": "pfedmma", "seed": 1}
    assert runs[1].folder == tmp_path / "runs" / "pfedmma" / "seed-1"
    with pytest.raises(PlanError, match="shots=-1"):
        plan_runs(tmp_path, {}, ["pfedmma"], [0], {"shots": -1})
    with pytest.raises(PlanError, match="unknown key 'shot'"):
        plan_runs(tmp_path, {"shot": 4}, ["pfedmma"], [0], {})


def test_a_finished_run_of_another_config_is_not_reused(tmp_path: Path) -> None:
    (run,) = plan_runs(tmp_path, {"shots": 4}, ["pfedmma"], [0], {})
    run_dir = _fake_run(run.folder, 0, 0.7, 0.6)
    run.record_path.write_text(json.dumps({"status": "completed", "run-config": run.run_config, "run-dir": str(run_dir)}))
    assert run.completed_dir() == run_dir
    (other,) = plan_runs(tmp_path, {"shots": 8}, ["pfedmma"], [0], {})
    with pytest.raises(PlanError, match="another config"):
        other.completed_dir()


@pytest.mark.parametrize("value", ["a 'quoted' \"string\"", "~/runs", 3, 0.05, True, "pfedmma"])
def test_run_config_values_survive_the_toml_file(value: object) -> None:
    assert tomllib.loads(f"key = {_toml_value(value)}")["key"] == value


def test_a_deployment_run_writes_where_the_serverapp_sees_the_results(tmp_path: Path) -> None:
    (run,) = plan_runs(tmp_path, {}, ["pfedmma"], [2], {})
    target = Target(REPO, connection="cluster", server_output_dir="/results/cmp")
    command = target.command(run, tmp_path / "runs", state_dir=None)
    assert command[2:4] == [str(REPO), "cluster"] and "--federation-config" not in command
    written = tomllib.loads((run.folder / "run-config.toml").read_text())
    assert written["output-dir"] == "/results/cmp/pfedmma/seed-2" and "state-dir" not in written


@pytest.fixture
def flwr_env(tmp_path: Path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    yield flower_env(home)
    stop_processes_under(home)


def _compare(env: dict[str, str], out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "server.compare", "--preset", "conf/ci.toml", "--methods", "pfedmma,zeroshot",
               "--seeds", "0,1", "--supernodes", "2", "--out", str(out), *extra]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)


def test_the_ci_comparison_runs_through_flower_and_tables_agree_with_the_run_directories(flwr_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = _compare(flwr_env, out)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "[compare 4/4 zeroshot seed 1] done" in result.stdout
    assert "round 2/2" in result.stdout  # the runs' progress is shown

    saved = {m["method"]: m for m in json.loads((out / "results.json").read_text())["methods"]}
    assert set(saved) == {"pfedmma", "zeroshot"}
    for method, entry in saved.items():
        summaries = []
        for seed in (0, 1):
            record = json.loads((out / "runs" / method / f"seed-{seed}" / "compare.json").read_text())
            assert record["status"] == "completed" and record["run-config"]["seed"] == seed
            summaries.append(json.loads((Path(record["run-dir"]) / "summary.json").read_text()))
            assert (Path(record["run-dir"]) / "config.json").is_file()
        for metric in ("local", "base", "novel", "hm3"):
            values = [s["evaluation"][metric] for s in summaries]
            assert entry["metrics"][metric]["mean"] == pytest.approx(statistics.fmean(values))
            assert entry["metrics"][metric]["std"] == pytest.approx(statistics.stdev(values))
        assert entry["floats-up-per-client-round"] == summaries[0]["communication"]["floats-up-per-client-round"]
    assert saved["zeroshot"]["floats-up-per-client-round"] == 0 and saved["pfedmma"]["trainable-per-client"] > 0
    # Seeds differ in data and draws, so their results differ: the spread is real.
    assert saved["pfedmma"]["metrics"]["local"]["std"] > 0
    table = (out / "table.md").read_text()
    assert table.count("\n| pfedmma | 2 |") == 1 and "| zeroshot | 2 |" in table
    for name in ("curves.png", "local_vs_novel.png"):
        assert (out / name).read_bytes().startswith(PNG)

    # Run again: everything is complete, nothing re-runs, the table is the same.
    again = _compare(flwr_env, out)
    assert again.returncode == 0 and again.stdout.count("already complete") == 4
    assert "starting" not in again.stdout
    assert (out / "table.md").read_text().split("\n\nAccuracy")[0] == table.split("\n\nAccuracy")[0]
