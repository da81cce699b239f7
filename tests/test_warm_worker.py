"""The node's warm worker (client.warm, client.worker), with real worker processes: the same
replies as the ClientApp process, one worker reused across messages, a dead worker replaced,
trouble degrading to the in-process path, a private socket directory, and idle exit."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, RecordDict
from safetensors.torch import load_file

from client import warm
from common.arrays import from_record
from common.config import RunConfig
from common.errors import PERMANENT_ERROR_CODE
from common.methods import method_for
from common.model.roles import Role
from tests.flower_messages import instruction, wire_bytes
from tests.leaks import leaked_rows


def _workers(directory: Path) -> list[int]:
    """Pids of the worker processes serving sockets in ``directory``."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"client.worker" in cmdline and str(directory).encode() in cmdline:
                found.append(int(proc.name))
    return found


@pytest.fixture
def node(tmp_path: Path):
    directory = tmp_path / "warm"
    yield directory
    for pid in _workers(directory):
        os.kill(pid, signal.SIGKILL)


def _context(run_config: dict[str, Any], directory: Path, state: Path, **node: Any) -> Context:
    node_config = {"partition-id": 0, "num-partitions": 3, "warm-worker-dir": str(directory), **node}
    return Context(run_id=5, node_id=100, node_config=node_config, state=RecordDict(), run_config={**run_config, "state-dir": str(state)})


def _shared(run_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    return method_for(RunConfig.from_flower(run_config)).initial_state()[Role.SHARED]


def test_the_warm_path_replies_as_the_clientapp_process_and_keeps_one_worker(
    run_config: dict[str, Any], tmp_path: Path, node: Path
) -> None:
    from client.work import handle

    shared = _shared(run_config)
    here = _context(run_config, node, tmp_path / "state-here")
    there = _context(run_config, node, tmp_path / "state-warm", **{"warm-worker-idle": 60})
    for server_round in (1, 2):
        expected = handle(instruction(shared, "train", server_round, 100), here)
        got = warm.handle(instruction(shared, "train", server_round, 100), there)
        assert got is not None and not got.has_error()
        assert got.metadata.reply_to_message_id == f"train-{server_round}-100"
        sent, want = from_record(got.content.array_records["arrays"]), from_record(expected.content.array_records["arrays"])
        assert set(sent) == set(shared)  # shared tensors only: nothing private leaves the worker either
        assert all(torch.equal(sent[k], want[k]) for k in want)
        assert dict(got.content.metric_records["metrics"]) == dict(expected.content.metric_records["metrics"])
    assert dict(got.content.metric_records["metrics"])["private-source"] == 2  # read from the node's disk
    evaluated = warm.handle(instruction(shared, "evaluate", 2, 100), there)
    assert evaluated is not None
    assert dict(evaluated.content.metric_records["metrics"]) == dict(
        handle(instruction(shared, "evaluate", 2, 100), here).content.metric_records["metrics"]
    )
    (pid,) = _workers(node)  # one worker served all three messages, and built the model once
    assert (node.stat().st_mode & 0o777) == 0o700
    assert (node / f"{warm.worker_key(there)}.log").read_text().count("client.runtime INFO building") == 1
    # Nothing private in what the warm path hands to Flower: the private tensors it stored on the
    # node's disk are not in the reply's bytes, while the shared ones are (the positive control).
    private = load_file(str(tmp_path / "state-warm" / "run-5" / "client-0.safetensors"))
    assert private and leaked_rows(wire_bytes(got), private) == [] and leaked_rows(wire_bytes(evaluated), private) == []
    assert leaked_rows(wire_bytes(got), from_record(got.content.array_records["arrays"]))

    os.kill(pid, signal.SIGKILL)  # a dead worker leaves a stale socket: a new worker takes over
    time.sleep(0.5)
    again = warm.handle(instruction(shared, "train", 3, 100), there)
    assert again is not None and not again.has_error()
    assert _workers(node) != [pid] and len(_workers(node)) == 1


def test_without_a_usable_worker_the_message_runs_in_the_clientapp_process(
    run_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client import app

    open_dir = tmp_path / "shared-dir"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)  # other users could reach the socket: refused
    ctx = _context(run_config, open_dir, tmp_path / "state")
    msg = instruction(_shared(run_config), "train", 1, 100)
    assert warm.handle(msg, ctx) is None
    monkeypatch.setattr(warm, "enabled", lambda context: True)
    reply = app.train(msg, ctx)  # the ClientApp's handler: warm path refused, work done here
    assert not reply.has_error() and set(from_record(reply.content.array_records["arrays"])) == set(_shared(run_config))
    assert not list(open_dir.iterdir())


def test_simulation_and_opt_out_keep_the_in_process_path(run_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _context(run_config, tmp_path / "w", tmp_path / "state")
    assert not warm.enabled(ctx)  # pytest is not a flwr-clientapp process (nor is a Ray actor)
    monkeypatch.setattr("sys.argv", ["/venv/bin/flwr-clientapp", "--insecure"])
    assert warm.enabled(ctx)
    assert not warm.enabled(_context(run_config, tmp_path / "w", tmp_path / "state", **{"warm-worker": False}))


def test_each_run_config_and_code_version_has_its_own_worker(run_config: dict[str, Any], tmp_path: Path) -> None:
    one = warm.worker_key(_context(run_config, tmp_path, tmp_path / "s"))
    assert one == warm.worker_key(_context(run_config, tmp_path, tmp_path / "s"))
    assert one != warm.worker_key(_context({**run_config, "learning-rate": 0.5}, tmp_path, tmp_path / "s"))
    assert one != warm.worker_key(_context(run_config, tmp_path, tmp_path / "s", **{"partition-id": 1}))
    code = tmp_path / "app"
    for package in warm.PACKAGES:
        (code / package).mkdir(parents=True)
        (code / package / "a.py").write_text("x = 1\n")
    before = warm.code_version(code)
    (code / "common" / "a.py").write_text("x = 2\n")
    assert warm.code_version(code) != before


@pytest.mark.slow
def test_permanent_errors_keep_their_code_and_an_idle_worker_exits(run_config: dict[str, Any], tmp_path: Path, node: Path) -> None:
    config = {**run_config, "dataset": "cifar10", "data-dir": str(tmp_path / "no-such-data")}
    ctx = _context(config, node, tmp_path / "state", **{"warm-worker-idle": 4})
    reply = warm.handle(instruction({}, "train", 1, 100), ctx)
    assert reply is not None and reply.has_error() and reply.error.code == PERMANENT_ERROR_CODE
    assert "client 0" in reply.error.reason
    assert len(_workers(node)) == 1
    deadline = time.monotonic() + 30
    while _workers(node) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _workers(node) and not list(node.glob("*.sock"))


@pytest.mark.slow
def test_a_worker_dying_mid_message_degrades_and_each_run_config_gets_its_own_worker(
    run_config: dict[str, Any], tmp_path: Path, node: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from client import app

    shared = _shared(run_config)
    ctx = _context(run_config, node, tmp_path / "state", **{"warm-worker-idle": 60})
    first = warm.handle(instruction(shared, "train", 1, 100), ctx)
    assert first is not None and not first.has_error()
    (pid,) = _workers(node)

    # The worker dies while a ClientApp waits for its reply: no reply is lost, the message runs in
    # the ClientApp process after one warning.
    os.kill(pid, signal.SIGSTOP)
    answers: list[Any] = []
    waiting = threading.Thread(target=lambda: answers.append(warm.handle(instruction(shared, "train", 2, 100), ctx)))
    with caplog.at_level(logging.WARNING, logger="client.warm"):
        waiting.start()
        time.sleep(1.0)  # connected and sent; waiting for the reply
        os.kill(pid, signal.SIGKILL)
        waiting.join(timeout=30)
    assert answers == [None]
    assert [r.levelname for r in caplog.records if r.name == "client.warm"] == ["WARNING"]
    assert "running this message in the ClientApp process" in caplog.records[-1].getMessage()
    time.sleep(0.5)
    assert not _workers(node)
    # What client.app does with that None: the same message, in this process.
    in_process = app._handle(instruction(shared, "train", 2, 100), ctx)  # warm.enabled is False under pytest
    assert not in_process.has_error()

    # The next message starts a new worker on the stale socket's key.
    again = warm.handle(instruction(shared, "train", 3, 100), ctx)
    assert again is not None and not again.has_error()
    (replacement,) = _workers(node)
    assert replacement != pid

    # Another run config (here a learning rate) is another worker, beside the first.
    other = _context({**run_config, "learning-rate": 0.5}, node, tmp_path / "state-other", **{"warm-worker-idle": 60})
    assert warm.handle(instruction(shared, "train", 1, 100), other) is not None
    assert len(_workers(node)) == 2 and replacement in _workers(node)
    assert len(list(node.glob("*.sock"))) == 2
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in node.glob("*.log"))


def test_only_the_nodes_latest_gpu_user_keeps_gpu_memory_when_idle(tmp_path: Path) -> None:
    """The GPU rule of an idle worker (client.worker.idle_action) and the holder file it reads."""
    from client.worker import claim_gpu, idle_action, read_holder

    me, other = 100, 200
    assert idle_action(5.0, 120.0, holds_gpu=False, holder=other, me=me) == "keep"  # nothing on a GPU
    assert idle_action(5.0, 120.0, holds_gpu=True, holder=other, me=me) == "exit"  # another run's worker took over
    assert idle_action(5.0, 120.0, holds_gpu=True, holder=me, me=me) == "keep"  # between rounds: stay warm
    assert idle_action(121.0, 120.0, holds_gpu=True, holder=me, me=me) == "release"
    assert idle_action(121.0, 120.0, holds_gpu=True, holder=None, me=me) == "release"
    assert read_holder(tmp_path) is None
    claim_gpu(tmp_path)
    assert read_holder(tmp_path) == os.getpid()
    assert [p.name for p in tmp_path.iterdir()] == ["gpu-holder"]  # written atomically, no temp file left
