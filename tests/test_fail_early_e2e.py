"""Fail loud and early, through `flwr run`: a run that cannot start stops before round 1; a client
with a corrupt image stops the run after round 1 naming the file, or, with `skip-corrupt`, leaves it
out and counts it. Data in CoOp's layout (DTD), made here."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tests.local_superlink import flwr_run, flwr_run_in

CLASSES = ["banded", "dotted", "grid", "woven"]  # base: banded, dotted; novel: grid, woven


def make_dtd(root: Path) -> Path:
    """DTD in CoOp's layout: 4 classes, 4 train / 1 val / 3 test images each."""
    images = root / "dtd" / "images"
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSES):
        for part, count in (("train", 4), ("val", 1), ("test", 3)):
            for i in range(count):
                rel = f"{name}/{part}_{i}.jpg"
                (images / name).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), (60 * label, 20 * i, 100)).save(images / rel)
                split[part].append([rel, label, name])
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    return images


def _config(tmp_path: Path, runs: Path, data: Path, extra: str = "") -> str:
    rounds = "" if "num-server-rounds" in extra else "num-server-rounds=2 "
    return (
        f"dataset='dtd' data-dir='{data}' shots=0 batch-size=4 {rounds}local-epochs=1 "
        f"model-name='pfedmma-tiny' pretrained='' output-dir='{runs}' state-dir='{tmp_path / 'state'}' {extra}"
    )


def _summary(runs: Path) -> dict:
    (run_dir,) = runs.iterdir()
    return json.loads((run_dir / "summary.json").read_text())


def test_bad_input_stops_the_run_early_and_says_why(flwr_home: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    images = make_dtd(data)

    # The default config (whose dataset-domains suits shapes) runs DTD; adapter-end beyond the
    # 4-block model stops it before round 1, naming the key, and no client is asked to work.
    runs = tmp_path / "runs-preflight"
    result = flwr_run(flwr_home, _config(tmp_path, runs, data, "adapter-end=99"), supernodes=2, timeout=300)
    output = result.stdout + result.stderr
    assert "[pfedmma] FAILED before round 1: the run cannot start:" in output, output[-3000:]
    assert "adapter-end=99" in output and "[pfedmma] round" not in output
    assert not runs.exists()

    # One garbage training image: its client replies a permanent error naming the file, and the
    # run stops after round 1 (of 2) with a failed summary; the other client trained.
    corrupt = images / "banded" / "train_2.jpg"
    corrupt.write_bytes(b"not a jpeg")
    runs = tmp_path / "runs-corrupt"
    result = flwr_run_in(flwr_home, _config(tmp_path, runs, data), supernodes=2, timeout=300)
    output = result.stdout + result.stderr
    assert "[pfedmma] FAILED (pfedmma) after round 1:" in output, output[-3000:]
    assert "[pfedmma] round 2/2" not in output
    summary = _summary(runs)
    assert summary["status"] == "failed" and summary["rounds-completed"] == 1
    failure = summary["failure"]
    assert failure["round"] == 1 and len(failure["clients"]) == 1
    (who, why), = failure["clients"].items()
    assert who.startswith("client ") and str(corrupt) in why and "skip-corrupt" in why
    (row,) = [json.loads(line) for line in (runs / next(runs.iterdir()).name / "metrics.jsonl").read_text().splitlines()]
    assert row["valid-replies"] == 1
    # The failed client never trained: its evaluation (also refused) is not in any mean.
    assert row["clients-in-mean"] == 1

    # With skip-corrupt the file is left out and counted, and the run completes.
    runs = tmp_path / "runs-skip"
    result = flwr_run_in(flwr_home, _config(tmp_path, runs, data, "skip-corrupt=true num-server-rounds=1"), supernodes=2, timeout=300)
    output = result.stdout + result.stderr
    assert "[pfedmma] done (pfedmma): 1 rounds" in output, output[-3000:]
    assert "1 image(s) left out (skip-corrupt)" in output
    summary = _summary(runs)
    assert summary["status"] == "completed" and list(summary["skipped-images"].values()) == [1]
    assert summary["evaluation"]["local"] >= 0.0


def test_a_run_needing_more_nodes_than_connect_stops_naming_min_available_nodes(flwr_home: Path, tmp_path: Path) -> None:
    """A paper preset asks for 10 nodes; started with 2 it used to wait forever (Flower's sampling)."""
    runs = tmp_path / "runs"
    config = (f"min-available-nodes=10 min-train-nodes=2 min-evaluate-nodes=2 node-wait-timeout=5 "
              f"output-dir='{runs}' state-dir='{tmp_path / 'state'}'")
    result = flwr_run(flwr_home, config, supernodes=2, timeout=300)
    output = result.stdout + result.stderr
    assert "[pfedmma] FAILED before round 1: 2 of min-available-nodes=10 nodes connected within node-wait-timeout=5 s" in output, output[-3000:]
    assert not runs.exists() or not any(runs.iterdir())  # nothing ran: no run directory
