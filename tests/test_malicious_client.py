"""One malicious client in a real Flower simulation (`flwr run`, our real ServerApp) cannot
poison the global state, erase the other clients, crash the server or corrupt anyone's
private adapters.

The app under test is this repository's, with one change: its ClientApp is a wrapper that runs
our real handlers and, on partition 0, corrupts the reply; a different attack each round.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from tests.local_superlink import FLWR, REPO, flower_env

# round -> (what client 0 does to its training reply, the rejection reason the server must log)
ATTACKS = {
    1: ("huge-values", "above max-parameter-abs"),
    2: ("huge-count", "expected 1 to"),
    3: ("inf-count", "expected an integer number of examples"),
    4: ("fractional-count", "expected an integer number of examples"),
    5: ("oversized-update", "above update-norm-bound"),
    6: ("nan-count", "expected an integer number of examples"),
}

MALICIOUS_APP = '''
"""Our ClientApp, except that partition 0 corrupts its replies (tests/test_malicious_client.py)."""
import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.clientapp import ClientApp

from client.app import evaluate_handler, query_handler, train_handler

ATTACKS = ATTACKS_HERE
app = ClientApp()


@app.train()
def train(msg, context):
    reply = train_handler(msg, context)
    if context.node_config["partition-id"] != 0 or reply.has_error():
        return reply
    attack = ATTACKS[int(msg.content["config"]["server-round"])][0]
    metrics = reply.content["metrics"]
    arrays = {k: a.numpy().copy() for k, a in reply.content["arrays"].items()}
    sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    if attack == "huge-values":
        for a in arrays.values():
            a[...] = 1e30
    elif attack == "huge-count":
        metrics["num-examples"] = 10**12
    elif attack == "inf-count":
        metrics["num-examples"] = float("inf")
    elif attack == "fractional-count":
        metrics["num-examples"] = 3.5
    elif attack == "nan-count":
        metrics["num-examples"] = float("nan")
    elif attack == "oversized-update":  # finite, within max-parameter-abs, 50x the global's norm
        norm = float(np.sqrt(sum(float((s.astype(np.float64) ** 2).sum()) for s in sent.values())))
        count = sum(s.size for s in sent.values())
        arrays = {k: (s + 50.0 * norm / np.sqrt(count)).astype(s.dtype) for k, s in sent.items()}
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return reply


@app.evaluate()
def evaluate(msg, context):
    reply = evaluate_handler(msg, context)
    if context.node_config["partition-id"] == 0 and not reply.has_error():
        reply.content["metrics"]["local-accuracy"] = 7.5  # an accuracy no client can have
    return reply


app.query()(query_handler)
'''


def _app(tmp_path: Path) -> Path:
    """This repository's app with the malicious ClientApp in place of ours."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(REPO / "pyproject.toml", app / "pyproject.toml")
    text = (app / "pyproject.toml").read_text()
    text = text.replace('clientapp = "client.app:app"', 'clientapp = "malicious.client_app:app"')
    assert "malicious.client_app:app" in text
    (app / "pyproject.toml").write_text(text)
    (app / "malicious").mkdir()
    (app / "malicious" / "__init__.py").write_text("")
    (app / "malicious" / "client_app.py").write_text(MALICIOUS_APP.replace("ATTACKS_HERE", repr(ATTACKS)))
    for package in ("server", "client", "common"):  # the FAB carries the real code, as in a deployment
        shutil.copytree(REPO / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    return app


def test_one_malicious_client_cannot_poison_or_stop_the_federation(tmp_path: Path, flwr_home: Path) -> None:
    import subprocess

    out, state = tmp_path / "runs", tmp_path / "state"
    config = (
        f'num-server-rounds={len(ATTACKS)} local-epochs=1 shots=4 test-per-class=2 eval-every=0 '
        f'min-train-nodes=3 min-available-nodes=3 output-dir="{out}" state-dir="{state}" experiment-name="attack"'
    )
    proc = subprocess.run(
        [FLWR, "run", ".", "--stream", "--federation-config", "num-supernodes=3", "--run-config", config],
        cwd=_app(tmp_path), env=flower_env(flwr_home), capture_output=True, text=True, timeout=900, check=False,
    )
    log = proc.stdout + proc.stderr
    (run_dir,) = out.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", log[-4000:]
    assert summary["rounds-completed"] == len(ATTACKS)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        attack, reason = ATTACKS[row["round"]]
        assert row["valid-replies"] == 2, (attack, row["rejections"])
        train_rejections = [r for r in row["rejections"].values() if not r.startswith("evaluation")]
        assert len(train_rejections) == 1 and reason in train_rejections[0], (attack, row["rejections"])
        # Client 0's impossible accuracy is dropped: the means are over the two honest clients.
        assert sorted(row["per-client"]) == ["1", "2"]
        assert any("expected an accuracy in [0, 1]" in r for r in row["rejections"].values())
        assert all(0.0 <= v <= 1.0 for c in row["per-client"].values() for v in c.values())

    # The global shared state stays finite and near where it started, every round.
    initial = None
    for r in range(1, len(ATTACKS) + 1):
        tensors = load_file(str(run_dir / "global" / f"round-{r:03d}.safetensors"))
        assert all(np.isfinite(t).all() for t in tensors.values())
        largest = max(float(np.abs(t).max()) for t in tensors.values())
        initial = initial if initial is not None else largest
        assert largest < 10 * max(initial, 1.0), f"round {r}: |global| up to {largest}"

    # Every client's private adapters are finite on disk, the attacker's included (it trained honestly).
    files = sorted((state / "attack").glob("client-*.safetensors"))
    assert [f.name for f in files] == ["client-0.safetensors", "client-1.safetensors", "client-2.safetensors"]
    for f in files:
        assert all(np.isfinite(t).all() for t in load_file(str(f)).values()), f.name
    assert re.search(r"round 6/6 .*replies 2/3 ok, 2 rejected", log), log[-3000:]
