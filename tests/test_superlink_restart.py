"""A federation stays up across a SuperLink crash: real `flower-superlink` and `flower-supernode`
processes on loopback, each under scripts/supervise.sh (what a systemd unit's Restart=always or
compose's `restart: unless-stopped` does), the SuperLink killed with SIGKILL.

- Database in a file (compose.yaml, docker/systemd): the supervisor starts the SuperLink again on
  the same database and port; both SuperNodes reconnect by themselves with the same node ids
  (their supervisors never restart them), and the no-op app then completes a round that needs
  both nodes.
- In-memory database (Flower's default): the restarted SuperLink has forgotten the nodes; it
  answers their next request with "401 Unauthorized", each SuperNode exits (status 0), and only
  its supervisor starts it again.

Each test takes 30-60 s on two cores; marked slow (`pytest -m slow`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.local_superlink import FLWR, REPO, flower_env, free_port

pytestmark = pytest.mark.slow

BIN = Path(FLWR).parent
SUPERVISE = REPO / "scripts" / "supervise.sh"
NOOP_APP = REPO / "scripts" / "noop_app"
CONNECTION = "restart-test"
# A SuperNode sends a heartbeat every 30 s (Flower 1.41) and backs off up to about 20 s between
# reconnection attempts: 120 s covers both with room for a busy machine.
RECOVERY_TIMEOUT = 120.0


def _wait(check: Callable[[], bool], timeout: float, what: str, logs: Callable[[], str]) -> float:
    """Poll ``check`` until it holds; the seconds it took. Fails with the logs otherwise."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{logs()}")
        time.sleep(1.0)
    return time.monotonic() - start


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), children first."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Supervised:
    """A command under scripts/supervise.sh: the supervisor's pid, the command's current pid, its log."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], work: Path, restart_sec: int) -> None:
        self.name = name
        self.log = work / f"{name}.log"
        self.pidfile = work / f"{name}.pid"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                ["bash", str(SUPERVISE), "--restart-sec", str(restart_sec), "--pidfile", str(self.pidfile), "--", *argv],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=work,
                start_new_session=True,
            )

    def child(self) -> int | None:
        try:
            return int(self.pidfile.read_text())
        except (OSError, ValueError):
            return None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def starts(self) -> int:
        """How often the supervisor has started the command."""
        return self.text().count("] started (#")

    def stop(self) -> None:
        """SIGTERM to the supervisor (it stops the command), then SIGKILL to anything left, by pid."""
        left = _descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Federation:
    """A SuperLink and two SuperNodes on loopback, own ports and FLWR_HOMEs, each supervised."""

    def __init__(self, work: Path, database: str) -> None:
        self.work = work
        self.database = database
        self.port = free_port()  # Fleet, Control and Runtime APIs share the SuperLink's one port
        self.running: list[Supervised] = []
        ops = self._home("ops")
        (ops / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def _home(self, name: str) -> Path:
        home = self.work / "flwr-home" / name
        home.mkdir(parents=True, exist_ok=True)
        return home

    def env(self, name: str) -> dict[str, str]:
        return {**flower_env(self._home(name)), "OMP_NUM_THREADS": "1"}

    def start(self, name: str, argv: list[str], restart_sec: int = 2) -> Supervised:
        supervised = Supervised(name, argv, self.env(name), self.work, restart_sec)
        self.running.append(supervised)
        return supervised

    def start_superlink(self) -> Supervised:
        return self.start("superlink", [
            str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
            "--database", self.database, "--disable-runtime-dependency-installation",
        ], restart_sec=5)  # RestartSec=5, as in docker/systemd: long enough for the nodes to notice

    def start_supernode(self, partition: int) -> Supervised:
        return self.start(f"supernode-{partition}", [
            str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--port", str(free_port()), "--node-config", f"partition-id={partition} num-partitions=2",
        ])

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([FLWR, *args], env=self.env("ops"), cwd=self.work, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def online(self) -> set[int]:
        """Node ids the SuperLink reports online; empty while it does not answer."""
        done = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        try:
            answer: dict[str, Any] = json.loads(done.stdout[done.stdout.index("{"):])
        except ValueError:
            return set()
        if not answer.get("success", True):  # with --format json, flwr exits 0 on failure too
            return set()
        return {int(n["node-id"]) for n in answer.get("nodes", []) if n.get("status") == "online"}

    def logs(self) -> str:
        return "\n".join(f"--- {s.log.name}\n{s.text()[-4000:]}" for s in self.running)

    def stop(self) -> None:
        for supervised in reversed(self.running):
            supervised.stop()


def _crash_superlink(fed: Federation, link: Supervised) -> None:
    """SIGKILL, no shutdown at all (a power cut, the OOM killer); wait for the supervisor's restart."""
    crashed = link.child()
    assert crashed is not None
    os.kill(crashed, signal.SIGKILL)
    _wait(lambda: link.child() not in (None, crashed), 30, "the supervisor to start the SuperLink again", fed.logs)


def test_with_a_database_file_the_supernodes_reconnect_by_themselves(tmp_path: Path) -> None:
    fed = Federation(tmp_path, str(tmp_path / "superlink.db"))
    try:
        link = fed.start_superlink()
        nodes = [fed.start_supernode(0), fed.start_supernode(1)]
        _wait(lambda: len(fed.online()) == 2, RECOVERY_TIMEOUT, "both SuperNodes to join", fed.logs)
        before = fed.online()
        node_pids = [n.child() for n in nodes]
        seen = [len(n.text()) for n in nodes]  # what the nodes logged before the crash

        _crash_superlink(fed, link)

        # The database still lists both nodes online for a while: wait for the nodes' own word.
        def back() -> bool:
            reconnected = all("Connection successful" in n.text()[k:] for n, k in zip(nodes, seen, strict=True))
            return reconnected and len(fed.online()) == 2

        took = _wait(back, RECOVERY_TIMEOUT, "both SuperNodes to reconnect", fed.logs)
        print(f"[file] both SuperNodes reconnected {took:.1f}s after the SuperLink was started again")
        # They never went away: same processes, same node ids, no refusal.
        assert fed.online() == before
        assert [n.child() for n in nodes] == node_pids
        assert all(n.starts() == 1 for n in nodes), fed.logs()
        assert link.starts() == 2
        assert not any("401 Unauthorized" in n.text() for n in nodes)
        # And the federation works: a round that needs both nodes completes with both replies.
        times = tmp_path / "noop-times.jsonl"
        run = fed.flwr("run", str(NOOP_APP), CONNECTION, "--stream", "--run-config",
                       f"num-server-rounds=1 min-nodes=2 times-file='{times}'", timeout=240)
        assert times.exists(), run.stdout[-3000:] + run.stderr[-3000:] + fed.logs()
        rows = [json.loads(line) for line in times.read_text().splitlines()]
        assert [(r["round"], r["valid-replies"]) for r in rows] == [(1, 2)], rows
    finally:
        fed.stop()


IN_MEMORY_BUG = (
    "Flower 1.41's in-memory SQLite (one connection shared by every request) failed a concurrent "
    "request with sqlite3.OperationalError, and a SuperNode stayed up but disconnected "
    "(docs/deployment.md, 'Keeping a federation up across restarts')"
)


def test_with_the_in_memory_database_the_supernodes_are_refused_and_exit(tmp_path: Path) -> None:
    """Flower's default: the restarted SuperLink has forgotten the nodes. Only a supervisor that
    restarts on any exit status brings them back (they exit with 0). Whether they then rejoin is
    not asserted, and a wait that fails alongside the SuperLink's own database error is an
    expected failure: that in-memory database fails concurrent requests now and then, and a node
    that got the error stays up but disconnected."""
    fed = Federation(tmp_path, ":memory:")
    link = fed.start_superlink()

    def wait(check: Callable[[], bool], what: str) -> float:
        try:
            return _wait(check, RECOVERY_TIMEOUT, what, fed.logs)
        except pytest.fail.Exception:
            if "OperationalError" in link.text():
                pytest.xfail(IN_MEMORY_BUG)
            raise

    try:
        nodes = [fed.start_supernode(0), fed.start_supernode(1)]
        wait(lambda: len(fed.online()) == 2, "both SuperNodes to join")

        _crash_superlink(fed, link)

        took = wait(lambda: all(n.starts() >= 2 for n in nodes),
                    "both SuperNodes to exit and be started again by their supervisors")
        print(f"[memory] both SuperNodes exited and were restarted {took:.1f}s after the SuperLink was started again")
        # The restarted SuperLink refused them: 401 to a heartbeat or a message pull, whichever
        # came first (a node's own log does not always show it)...
        restarted = link.text().split("] started (#2)")[1]
        assert re.search(r'"POST /v1/fleet/[a-z-]+ HTTP/1.1" 401', restarted), restarted[-3000:]
        # ...and each exited with status 0, which Restart=on-failure would not have restarted.
        for node in nodes:
            first_run = node.text().split("] started (#2)")[0]
            assert "exited with status 0;" in first_run, node.text()[-3000:]
        assert link.starts() == 2
    finally:
        fed.stop()
