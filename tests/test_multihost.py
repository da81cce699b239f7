"""Multi-host deployment without Docker: a SuperLink and SuperNodes on separate "hosts"
(network namespaces, each with its own address), the real Flower 1.41 processes
(`flower-superlink` / `flower-supernode` with `--isolation process`, a `flower-superexec`
beside each), and the run submitted with `flwr run . <connection>` from an operator host.

- a full run with three clients;
- a SuperNode killed (SIGKILL, its SuperExec and ClientApp with it) mid-run: the round
  completes with the others; restarted with the same state-dir it continues with its
  private adapters from disk (metrics.jsonl "private-source" = "disk"), with a new node id;
- the same over TLS with SuperNode authentication: the restarted node keeps its node id,
  and a node whose key was never registered is refused;
- an exception in one client's training: an error reply that the server records under
  "rejections" with the reason, while the others are averaged.

Each message starts a new ClientApp process (imports, model build), so a round costs tens
of seconds on two cores; the file takes 9-12 minutes and is marked slow (`pytest -m slow`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.netns import Host, Network, Process

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PORT = 8000  # the SuperLink's one HTTP(S) port: Fleet, Control and Runtime APIs
NODE_RUNTIME = "127.0.0.1:9094"  # each SuperNode's runtime API, on its own host's loopback
CONNECTION = "lab"
SUBNET = "10.77.0"
LINK_ADDRESS = f"{SUBNET}.1"  # the SuperLink host

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0,
                       reason="multi-host tests need root for network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="multi-host tests need `ip` (iproute2)"),
]

# A small run: four images per class, two test images per class, one epoch, the default model.
SMALL = "eval-every=0 test-per-class=2 shots=4 local-epochs=1"
# Without evaluation messages a round is one message per client: half the time.
NO_EVAL = "fraction-evaluate=0.0 min-evaluate-nodes=0"


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path
    node_keys: list[Path]  # private keys; the public key is the same path + ".pub"


@dataclass
class Node:
    host: Host
    node_config: str
    key: Path | None = None
    supernode: Process | None = None
    superexec: Process | None = None
    starts: int = 0


@dataclass
class Federation:
    """One SuperLink host, an operator host (`flwr`), and SuperNode hosts, on one bridge."""

    net: Network
    work: Path
    certs: Certs | None = None
    nodes: dict[str, Node] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.link = self.net.add_host("link", int(LINK_ADDRESS.rsplit(".", 1)[1]))
        self.ops = self.net.add_host("ops", 100)
        self.address = f"{self.link.address}:{PORT}"
        self.runs = self.work / "runs"
        tls = f'root-certificates = "{self.certs.ca}"\n' if self.certs else "insecure = true\n"
        self._home("ops").joinpath("config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{self.address}"\n{tls}'
        )

    def _home(self, host: str) -> Path:
        home = self.work / "flwr-home" / host  # each host has its own FLWR_HOME (installed FABs)
        home.mkdir(parents=True, exist_ok=True)
        return home

    def env(self, host: str) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self._home(host)),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # Three "hosts" share two cores: one thread per ClientApp avoids oversubscription.
            "OMP_NUM_THREADS": "1",
        }

    def log(self, name: str) -> Path:
        (self.work / "logs").mkdir(exist_ok=True)
        return self.work / "logs" / f"{name}.log"

    # -- SuperLink side --------------------------------------------------------------

    def start_superlink(self) -> None:
        argv = [str(BIN / "flower-superlink"), "--isolation", "process", "--host", "0.0.0.0", "--port", str(PORT),
                "--disable-runtime-dependency-installation"]
        exec_tls = ["--insecure"]
        if self.certs:
            argv += ["--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile", str(self.certs.cert),
                     "--ssl-keyfile", str(self.certs.key), "--enable-supernode-auth"]
            exec_tls = ["--root-certificates", str(self.certs.ca)]
        else:
            argv.append("--insecure")
        env = self.env("link")
        self.superlink = self.link.start("superlink", argv, self.log("superlink"), env, cwd=self.work)
        # The ServerApp's SuperExec reaches the Runtime API on the same port, locally.
        self.link.start("superexec", [str(BIN / "flower-superexec"), "--runtime-api-address", f"127.0.0.1:{PORT}",
                                      *exec_tls], self.log("superlink-superexec"), env, cwd=self.work)
        self.wait(lambda: self.flwr("supernode", "list").returncode == 0, 60, "the SuperLink's Control API to answer")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A `flwr` command on the operator host against the SuperLink connection."""
        return self.ops.run([str(BIN / "flwr"), *args], self.env("ops"), cwd=REPO, timeout=timeout)

    def node_list(self) -> list[dict[str, Any]]:
        done = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        # With --format json, flwr exits 0 also on failure: "success" says which.
        answer = json.loads(done.stdout[done.stdout.index("{"):]) if "{" in done.stdout else {}
        assert answer.get("success", True) and "nodes" in answer, done.stdout + done.stderr
        return list(answer["nodes"])

    def online(self) -> set[int]:
        return {int(n["node-id"]) for n in self.node_list() if n["status"] == "online"}

    def register(self, key: Path) -> int:
        done = self.flwr("supernode", "register", f"{key}.pub", CONNECTION, "--format", "json")
        assert done.returncode == 0, done.stdout + done.stderr
        return int(json.loads(done.stdout[done.stdout.index("{"):])["node-id"])

    def submit(self, run_config: str) -> Process:
        """`flwr run . lab --stream` in the background on the operator host."""
        argv = [str(BIN / "flwr"), "run", ".", CONNECTION, "--stream", "--run-config",
                f"{run_config} output-dir='{self.runs}'"]
        return self.ops.start("flwr-run", argv, self.log("flwr-run"), self.env("ops"), cwd=REPO)

    # -- SuperNode side --------------------------------------------------------------

    def add_node(self, name: str, octet: int, node_config: str, key: Path | None = None) -> Node:
        node = Node(self.net.add_host(name, octet), node_config, key)
        self.nodes[name] = node
        return node

    def start_node(self, name: str) -> None:
        node = self.nodes[name]
        node.starts += 1
        env = self.env(name)
        argv = [str(BIN / "flower-supernode"), "--superlink", self.address, "--isolation", "process",
                "--node-config", node.node_config]
        if self.certs:
            argv += ["--root-certificates", str(self.certs.ca)]
        else:
            argv.append("--insecure")
        if node.key is not None:
            argv += ["--auth-supernode-private-key", str(node.key)]
        tag = f"{name}-{node.starts}"
        node.supernode = node.host.start("supernode", argv, self.log(f"supernode-{tag}"), env, cwd=self.work)
        # The SuperNode's runtime API is local to its host and plain HTTP.
        node.superexec = node.host.start("superexec", [str(BIN / "flower-superexec"), "--insecure",
                                                       "--runtime-api-address", NODE_RUNTIME],
                                         self.log(f"supernode-superexec-{tag}"), env, cwd=self.work)

    def kill_node(self, name: str) -> None:
        """The host dies: SuperNode, SuperExec and any ClientApp, without a goodbye."""
        node = self.nodes[name]
        for proc in (node.superexec, node.supernode):
            assert proc is not None
            proc.kill()

    # -- observing the run -------------------------------------------------------------

    def run_dir(self) -> Path | None:
        found = sorted(self.runs.iterdir()) if self.runs.exists() else []
        assert len(found) <= 1, found
        return found[0] if found else None

    def rows(self) -> list[dict[str, Any]]:
        run_dir = self.run_dir()
        path = run_dir / "metrics.jsonl" if run_dir else None
        rows = []
        for line in path.read_text().splitlines() if path and path.exists() else []:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                break
        return rows

    def wait_rounds(self, n: int, timeout: float) -> list[dict[str, Any]]:
        self.wait(lambda: len(self.rows()) >= n, timeout, f"round {n} in metrics.jsonl")
        return self.rows()

    def wait_done(self, run: Process, timeout: float) -> dict[str, Any]:
        """The run's summary.json (the run directory, not the log stream, is the record)."""
        self.wait(lambda: (d := self.run_dir()) is not None and (d / "summary.json").exists(), timeout, "summary.json")
        run_dir = self.run_dir()
        assert run_dir is not None
        run.popen.wait(timeout=60)  # the log stream ends with the run
        return dict(json.loads((run_dir / "summary.json").read_text()))

    def wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{self.diagnostics()}")
            time.sleep(1)

    def diagnostics(self, tail: int = 2500) -> str:
        logs = sorted((self.work / "logs").glob("*.log")) if (self.work / "logs").exists() else []
        return "\n".join(f"==== {p.name} ====\n{p.read_text(errors='replace')[-tail:]}" for p in logs)


def _node_config(partition: int, state_dir: Path, partitions: int = 3) -> str:
    return f"partition-id={partition} num-partitions={partitions} state-dir='{state_dir}'"


def make_certs(out: Path, host: str, nodes: int, script: Path = REPO / "scripts" / "make_certs.sh") -> Certs:
    """The project's scripts/make_certs.sh when present, else the same files via openssl/ssh-keygen."""
    if script.exists():
        done = subprocess.run(["bash", str(script), "--out", str(out), "--host", host, "--nodes", str(nodes)],
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    else:
        out.mkdir(parents=True)

        def sh(*argv: str) -> None:
            subprocess.run(argv, cwd=out, check=True, capture_output=True)

        sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key",
           "-out", "ca.crt", "-subj", "/CN=test CA")
        sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "superlink.key", "-out", "superlink.csr",
           "-subj", "/CN=superlink")
        (out / "san.ext").write_text(f"subjectAltName=IP:{host},IP:127.0.0.1,DNS:localhost\n")
        sh("openssl", "x509", "-req", "-in", "superlink.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
           "-days", "2", "-out", "superlink.crt", "-extfile", "san.ext")
        for i in range(nodes):
            sh("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", f"supernode-{i}")
    return Certs(out / "ca.crt", out / "superlink.crt", out / "superlink.key",
                 [out / f"supernode-{i}" for i in range(nodes)])


@pytest.fixture
def make_federation(tmp_path: Path, request: pytest.FixtureRequest):
    """A factory for one federation per test; everything is torn down at the end, pass or fail."""
    reason = netns.available()
    if reason:
        pytest.skip(reason)
    made: list[Federation] = []

    def make(certs: Certs | None = None) -> Federation:
        net = Network(request.node.name.removeprefix("test_")[:6], SUBNET)
        try:
            fed = Federation(net, tmp_path, certs)
        except BaseException:
            net.close()
            raise
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.net.close()


@pytest.mark.parametrize("method", ["pfedmma", "pfedmoap"])
def test_three_hosts_full_run(make_federation, tmp_path: Path, method: str) -> None:
    fed = make_federation()
    fed.start_superlink()
    for i in range(3):
        fed.add_node(f"c{i}", 10 + i, _node_config(i, tmp_path / f"state-c{i}"))
        fed.start_node(f"c{i}")
    # All three must be in every round: sampling waits until three are connected.
    run = fed.submit(f"method='{method}' num-server-rounds=2 {SMALL} min-available-nodes=3 min-train-nodes=3 min-evaluate-nodes=3")
    summary = fed.wait_done(run, timeout=600)

    assert run.popen.returncode == 0, fed.diagnostics()
    assert "[pfedmma] round 2/2" in run.output()
    rows = fed.rows()
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["sampled"] == 3 and row["valid-replies"] == 3 and row["rejections"] == {}, row
        assert set(row["per-client"]) == {"0", "1", "2"}
    assert rows[0]["private-source"] == {"0": "init", "1": "init", "2": "init"}
    # Round 2: every client's adapters come back from its node's disk (never from context.state).
    assert rows[1]["private-source"] == {"0": "disk", "1": "disk", "2": "disk"}
    assert set(rows[1]["evaluation"]) >= {"local", "base", "novel", "hm3"}
    assert summary["rounds-completed"] == 2 and summary["total-rejected-replies"] == 0
    for i in range(3):  # each host wrote its own private state, on its own state-dir
        assert [p.name for p in (tmp_path / f"state-c{i}").rglob("*.safetensors")] == [f"client-{i}.safetensors"]
    if method == "pfedmoap":  # round 2: the averaged prompt and the two other clients' as experts
        assert all(c["floats-down"] >= 3 * c["floats-up"] for c in rows[1]["communication"].values()), rows[1]


def _kill_and_restart(
    fed: Federation, tmp_path: Path, rounds: int, keys: list[Path] | None = None,
    before_restart: Callable[[], None] = lambda: None, method: str = "pfedmma",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Three clients; kill c2 as round 2 starts, restart it once round 2 is over, run to the end."""
    for i in range(3):
        fed.add_node(f"c{i}", 10 + i, _node_config(i, tmp_path / f"state-c{i}"), key=keys[i] if keys else None)
        fed.start_node(f"c{i}")
    fed.wait(lambda: len(fed.online()) == 3, 120, "three SuperNodes online")
    # Two replies suffice; a node that does not answer costs the round at most its
    # heartbeat patience (2 x 30 s) before the SuperLink answers "Node Unavailable".
    run = fed.submit(f"method='{method}' num-server-rounds={rounds} {SMALL} {NO_EVAL} min-available-nodes=2 min-train-nodes=2 "
                     "round-timeout=240")
    rows = fed.wait_rounds(1, timeout=300)
    assert rows[0]["valid-replies"] == 3, rows[0]
    # Round 2's messages are already out (rounds follow each other at once): a mid-round crash.
    fed.kill_node("c2")
    state_file = next((tmp_path / "state-c2").rglob("client-2.safetensors"))
    before = state_file.read_bytes()
    fed.wait_rounds(2, timeout=300)
    assert state_file.read_bytes() == before  # nobody touched c2's private state while it was down
    before_restart()
    fed.start_node("c2")  # same host, same node config, same state-dir
    summary = fed.wait_done(run, timeout=600)
    assert state_file.read_bytes() != before  # it trained again after the restart
    return fed.rows(), summary


def _check_fault_rows(rows: list[dict[str, Any]], rounds: int) -> int:
    """Round 2 completes without c2; c2 returns with its adapters from disk. Returns the rejoin round."""
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert rows[0]["private-source"] == {"0": "init", "1": "init", "2": "init"}
    crash = rows[1]
    assert crash["valid-replies"] == 2 and set(crash["private-source"]) == {"0", "1"}, crash
    # The crashed node's reply is Flower's "Node Unavailable" error, recorded as a rejection.
    assert len(crash["rejections"]) == 1 and "Node Unavailable" in next(iter(crash["rejections"].values())), crash
    back = [r for r in rows[2:] if "2" in r["private-source"]]
    assert back, f"c2 never came back: {rows}"
    # Its first round back: a new SuperNode process has no context.state, so the private
    # adapters come from the node's disk, not from the common initialisation.
    assert back[0]["private-source"]["2"] == "disk", back[0]
    assert all(r["private-source"]["2"] == "disk" for r in back)
    assert rows[-1]["valid-replies"] == 3 and rows[-1]["private-source"]["2"] == "disk", rows[-1]
    for row in rows[1:]:  # the survivors never lost their state
        assert row["private-source"]["0"] == row["private-source"]["1"] == "disk", row
    return int(back[0]["round"])


@pytest.mark.parametrize("method", ["pfedmma", "pfedmoap"])
def test_killed_supernode_round_completes_and_restart_resumes_private_state(make_federation, tmp_path: Path, method: str) -> None:
    fed = make_federation()
    fed.start_superlink()
    rounds = 5  # c2 is back in round 4 or 5: a margin of a round for its restart on a busy machine
    rows, summary = _kill_and_restart(fed, tmp_path, rounds, method=method)
    rejoined = _check_fault_rows(rows, rounds)
    if method == "pfedmoap":  # the restarted node (a new node id) is recognised and gets its two experts at once
        traffic = rows[rejoined - 1]["communication"]["2"]
        assert traffic["floats-down"] == 3 * traffic["floats-up"], rows[rejoined - 1]
    assert summary["rounds-completed"] == rounds
    # Without authentication a restarted SuperNode is a new node: a fourth node id, the old one offline.
    nodes = fed.node_list()
    assert len(nodes) == 4, nodes
    assert sorted(n["status"] for n in nodes) == ["offline", "online", "online", "online"], nodes


def test_tls_and_supernode_auth(make_federation, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", LINK_ADDRESS, nodes=4)
    fed = make_federation(certs)
    fed.start_superlink()
    ids = {f"c{i}": fed.register(certs.node_keys[i]) for i in range(3)}  # supernode-3 stays unregistered
    # An unregistered key is refused: the node never joins the federation.
    fed.add_node("rogue", 20, _node_config(0, tmp_path / "state-rogue"), key=certs.node_keys[3])
    fed.start_node("rogue")
    rounds = 5  # c2 is back in round 4 or 5: a margin of a round for its restart on a busy machine
    offline_after_crash: set[int] = set()

    def before_restart() -> None:
        offline_after_crash.update(int(n["node-id"]) for n in fed.node_list() if n["status"] == "offline")

    rows, summary = _kill_and_restart(fed, tmp_path, rounds, keys=certs.node_keys[:3], before_restart=before_restart)
    back = _check_fault_rows(rows, rounds)
    assert summary["rounds-completed"] == rounds
    # With authentication the restarted node keeps its node id: c2's registered id went
    # offline and came back, and no other id ever appeared.
    assert offline_after_crash == {ids["c2"]}, offline_after_crash
    nodes = fed.node_list()
    assert {int(n["node-id"]) for n in nodes} == set(ids.values()), nodes
    assert fed.online() == set(ids.values())
    assert all(r["sampled"] <= 3 for r in rows) and back >= 3
    # The unregistered node: the SuperLink refused to activate it, and it gave up.
    rogue = fed.nodes["rogue"].supernode
    assert rogue is not None and rogue.popen.wait(timeout=60) != 0, rogue.output()[-3000:]
    assert "Failed to activate SuperNode" in rogue.output(), rogue.output()[-3000:]
    refusals = [line for line in fed.superlink.output().splitlines() if "No SuperNode found with the given public key" in line]
    assert len(refusals) >= 1, fed.superlink.output()[-3000:]
    assert f'{fed.nodes["rogue"].host.address}:' in fed.superlink.output()  # its request did arrive
    assert not (tmp_path / "state-rogue").exists()  # it never ran a ClientApp


def test_client_exception_is_an_error_reply_and_the_round_continues(make_federation, tmp_path: Path) -> None:
    fed = make_federation()
    fed.start_superlink()
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file where a directory is expected\n")
    fed.add_node("c0", 10, _node_config(0, tmp_path / "state-c0"))
    fed.add_node("c1", 11, _node_config(1, tmp_path / "state-c1"))
    # Its state-dir cannot be created, so its ClientApp raises after training.
    fed.add_node("bad", 12, _node_config(2, blocker / "state"))
    for name in ("c0", "c1", "bad"):
        fed.start_node(name)
    run = fed.submit(f"num-server-rounds=2 {SMALL} {NO_EVAL} min-available-nodes=3 min-train-nodes=3")
    summary = fed.wait_done(run, timeout=600)

    assert run.popen.returncode == 0, fed.diagnostics()
    rows = fed.rows()
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["sampled"] == 3 and row["valid-replies"] == 2, row
        assert set(row["private-source"]) == {"0", "1"}  # the two good clients were averaged
        (reason,) = row["rejections"].values()
        assert reason.startswith("error reply:") and "Not a directory" in reason, reason
    assert summary["rounds-completed"] == 2 and summary["total-rejected-replies"] == 2
    # The server logged the dropped replies (the ServerApp's log reaches `flwr run --stream`).
    assert "dropped reply of node" in run.output() or "error reply" in run.output(), run.output()[-3000:]


@pytest.mark.slow
def test_compare_command_against_a_deployment(make_federation, tmp_path: Path) -> None:
    """pfedmma-compare with --connection: every (method, seed) goes to the SuperLink, and the
    table comes from the run directories the ServerApp wrote (a path both hosts see)."""
    fed = make_federation()
    fed.start_superlink()
    for i in range(3):
        fed.add_node(f"c{i}", 10 + i, _node_config(i, tmp_path / f"state-c{i}"))
        fed.start_node(f"c{i}")
    out = tmp_path / "cmp"
    argv = [sys.executable, "-m", "server.compare", "--preset", "conf/ci.toml", "--methods", "pfedmma,zeroshot",
            "--seeds", "0", "--connection", CONNECTION, "--out", str(out),
            "--set", "min-available-nodes=3", "--set", "min-train-nodes=3", "--set", "min-evaluate-nodes=3"]
    done = fed.ops.run(argv, fed.env("ops"), cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + fed.diagnostics()
    saved = {m["method"]: m for m in json.loads((out / "results.json").read_text())["methods"]}
    assert set(saved) == {"pfedmma", "zeroshot"} and saved["pfedmma"]["clients"] == [3]
    record = json.loads((out / "runs" / "pfedmma" / "seed-0" / "compare.json").read_text())
    assert " lab --stream" in record["command"] and "--federation-config" not in record["command"]
    summary = json.loads((Path(record["run-dir"]) / "summary.json").read_text())
    assert saved["pfedmma"]["metrics"]["hm3"]["mean"] == summary["evaluation"]["hm3"]
    assert (out / "curves.png").is_file() and (out / "local_vs_novel.png").is_file()

    # The same run again on the same deployment (replies arrive in another order): the same numbers.
    again = out.with_name("cmp-again")
    argv_again = [a if a != str(out) else str(again) for a in argv]
    argv_again[argv_again.index("pfedmma,zeroshot")] = "pfedmma"
    done = fed.ops.run(argv_again, fed.env("ops"), cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def numbers(folder: Path) -> list[dict[str, Any]]:
        record = json.loads((folder / "runs" / "pfedmma" / "seed-0" / "compare.json").read_text())
        rows = [json.loads(line) for line in (Path(record["run-dir"]) / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert numbers(out) == numbers(again)
