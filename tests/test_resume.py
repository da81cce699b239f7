"""A run stopped after round k and resumed from its run directory (real `flwr stop`)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from tests.local_superlink import flwr_run_in, flwr_run_until


def _digests(state: Path) -> dict[str, str]:
    return {str(p.relative_to(state)): hashlib.sha256(p.read_bytes()).hexdigest() for p in state.rglob("*.safetensors")}


# pfedmma, a method with private prompt parts (fedpgp) and one whose server keeps per-client state
# (pfedmoap's prompt bank), all with `pytest -m slow`: each stops and resumes a run (about 100 s),
# more than the default suite's CI budget leaves room for.
ROUNDS = 40  # the ServerApp hears of `flwr stop` at its next heartbeat (Flower: every 30 s) at the latest


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pfedmma", "fedpgp", "pfedmoap"])
def test_stopped_run_resumes_with_continuous_history_and_private_state(flwr_home: Path, tmp_path: Path, method: str) -> None:
    runs, state = tmp_path / "runs", tmp_path / "state"
    # Enough rounds that `flwr stop`, which reaches the ServerApp process some seconds late, lands
    # before the run would have completed (a round here takes about a second).
    base = (f"num-server-rounds={ROUNDS} method='{method}' output-dir='{runs}' state-dir='{state}' eval-every=0 "
            "test-per-class=2 shots=4 local-epochs=1")
    run_id, output = flwr_run_until(flwr_home, base, 2, f"[pfedmma] round 1/{ROUNDS}", timeout=400)
    assert run_id, output[-3000:]
    (run_dir,) = runs.iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= rows[-1]["round"] < ROUNDS, f"stop came too late: {rows[-1]['round']} rounds done"
    assert not (run_dir / "summary.json").exists()  # it really stopped early
    before = _digests(state)
    assert len(before) == 2 and len({Path(p).parent for p in before}) == 1  # one namespace

    result = flwr_run_in(flwr_home, f"{base} resume-from='{run_dir}'", 2, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # The log stream can end before the run does (e.g. while the stopped run winds down):
    # the run directory, not the console, is the record.
    deadline = time.monotonic() + 300
    while not (run_dir / "summary.json").exists() and time.monotonic() < deadline:
        time.sleep(2)

    assert list(runs.iterdir()) == [run_dir]  # the same directory continues
    # A round in flight when `flwr stop` arrived may still have completed: the resumed run
    # records the round it actually continued after.
    info = json.loads((run_dir / "run.json").read_text())
    (resume,) = info["resumed-by"]
    done = resume["after-round"]
    assert 1 <= done < ROUNDS
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    # Private adapters came back (from disk, or from a node state the simulation kept for the
    # same namespace), not from the common init, in the first resumed round.
    assert set(rows[done]["private-source"].values()) == {"disk"}
    assert len(rows[done]["private-source"]) == 2
    assert set(rows[0]["private-source"].values()) == {"init"}
    after = _digests(state)
    assert set(after) == set(before) and all(after[k] != before[k] for k in after)  # same files, trained on

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds-completed"] == ROUNDS and summary["selected-round"] == ROUNDS
    globals_ = sorted(p.name for p in (run_dir / "global").iterdir())
    assert globals_ == [f"round-{r:03d}.safetensors" for r in range(ROUNDS + 1)]
    if method == "pfedmoap":  # the server's prompt bank was saved every round and resumed from
        assert sorted(p.name for p in (run_dir / "server").iterdir()) == [f"round-{r:03d}.safetensors" for r in range(1, ROUNDS + 1)]
        # The first resumed round already sends experts: the bank came back and the (new) node
        # ids were matched to clients. Per client: global + expert to train, own + expert to evaluate.
        assert all(c["floats-down"] == 4 * c["floats-up"] for c in rows[done]["communication"].values())
