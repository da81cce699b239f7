"""One run at a time per (experiment, client); a client refuses a poisoned global state and
keeps its last good private state."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client import reset_state
from client.app import app
from client.guards import UntrustedGlobalStateError
from common.config import RunConfig
from common.errors import PERMANENT_ERROR_CODE
from common.methods import method_for
from common.model.roles import Role
from tests.flower_messages import RUN_ID, instruction, private_on_disk


def _context(run_config: dict[str, Any], run_id: int, partition_id: int = 0) -> Context:
    return Context(
        run_id=run_id, node_id=100 + partition_id, node_config={"partition-id": partition_id, "num-partitions": 3},
        state=RecordDict(), run_config=dict(run_config),
    )


def _send(run_config: dict[str, Any], run_id: int, kind: str = "train", server_round: int = 1, owners: str = "") -> Message:
    shared = method_for(RunConfig.from_flower(run_config)).initial_state()[Role.SHARED]
    msg = instruction(shared, kind, server_round, node_id=100)
    msg.metadata.__dict__["_run_id"] = run_id
    msg.content["config"]["state-owners"] = owners
    return app(msg, _context(run_config, run_id))


@pytest.fixture
def shared_namespace(run_config: dict[str, Any]) -> dict[str, Any]:
    return {**run_config, "experiment-name": "shared", "num-server-rounds": 2, "local-epochs": 1}


def test_a_second_run_on_the_same_namespace_is_refused_until_the_first_ends(shared_namespace: dict[str, Any]) -> None:
    assert not _send(shared_namespace, 42).has_error()
    trained_by_42 = private_on_disk(shared_namespace, 0)

    refused = _send(shared_namespace, 43)
    assert refused.has_error() and refused.error.code == PERMANENT_ERROR_CODE
    assert "in use by run 42" in refused.error.reason and "--unlock" in refused.error.reason
    # Run 43 neither read nor overwrote run 42's adapters.
    assert all(torch.equal(v, trained_by_42[k]) for k, v in private_on_disk(shared_namespace, 0).items())

    # A resumed run continuing run 42 may take over at once.
    assert not _send(shared_namespace, 44, owners="42").has_error()
    # Run 44's final evaluation (round 2 of 2) releases the namespace: a new run may use it.
    assert not _send(shared_namespace, 44, kind="evaluate", server_round=2).has_error()
    assert not _send(shared_namespace, 45).has_error()


def test_two_runs_at_once_one_proceeds_the_other_is_refused(shared_namespace: dict[str, Any]) -> None:
    replies: dict[int, Message] = {}

    def run(run_id: int) -> None:
        replies[run_id] = _send(shared_namespace, run_id)

    threads = [threading.Thread(target=run, args=(r,)) for r in (50, 51)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = sorted(r for r, reply in replies.items() if reply.has_error())
    assert len(errors) == 1, {r: m.error.reason if m.has_error() else "ok" for r, m in replies.items()}
    winner = ({50, 51} - set(errors)).pop()
    assert f"in use by run {winner}" in replies[errors[0]].error.reason


def test_an_expired_or_unlocked_lease_can_be_taken_over(shared_namespace: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert not _send(shared_namespace, 60).has_error()
    assert _send(shared_namespace, 61).has_error()
    state = shared_namespace["state-dir"]
    assert reset_state.main(["--state-dir", state, "--experiment", "shared", "--client", "0", "--unlock"]) == 0
    assert "client-0.lock" in capsys.readouterr().out
    assert (Path(state) / "shared" / "client-0.safetensors").is_file()  # --unlock keeps the private state
    assert not _send(shared_namespace, 61).has_error()
    short = {**shared_namespace, "experiment-name": "short", "round-timeout": 0.001}  # a lease of 2 ms
    assert not _send(short, 62).has_error()
    assert not _send(short, 63).has_error()


@pytest.mark.parametrize("poison", [float("nan"), 1e30])
def test_a_poisoned_global_is_refused_and_the_private_state_kept(run_config: dict[str, Any], poison: float) -> None:
    cfg = RunConfig.from_flower(run_config)
    shared = method_for(cfg).initial_state()[Role.SHARED]
    ctx = _context(run_config, RUN_ID)
    assert not app(instruction(shared, "train", 1, node_id=100), ctx).has_error()
    before = private_on_disk(run_config, 0)
    name = next(iter(shared))
    bad = {**shared, name: torch.full_like(shared[name], poison)}
    for kind in ("train", "evaluate"):
        # Raised before anything is trained or saved; Flower turns it into this node's error reply.
        with pytest.raises(UntrustedGlobalStateError, match=name):
            app(instruction(bad, kind, 2, node_id=100), ctx)
    assert all(torch.equal(v, before[k]) for k, v in private_on_disk(run_config, 0).items())
