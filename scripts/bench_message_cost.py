"""Per-message cost of pFedMMA in a real Flower deployment, against a no-op ClientApp.

In a deployment every message starts a new ClientApp process (imports, model build, data),
so a round costs far more than its training. This script starts a local deployment on this
machine (one SuperLink and N SuperNodes, all with ``--isolation process`` and a
``flower-superexec`` beside each, as in compose.yaml), then runs in it, one after the other:

  (a) pFedMMA for R train-only rounds (``fraction-evaluate=0``: one message per client per round);
  (b) scripts/noop_app, whose ServerApp runs Flower's FedAvg loop for R rounds with a payload of
      the same size as pFedMMA's shared state and whose ClientApp just echoes it back.

It prints each round's wall time for both, their ratio and difference (pFedMMA's cost above
Flower's per-message floor), where a message's time goes on a SuperNode (from time-stamped logs),
how long the imports take in a fresh interpreter, and how long building the frozen model takes
without, into and from a backbone cache. No figures when a round had an error reply. Usage (from
the repository root, any Python environment with the project installed)::

    python scripts/bench_message_cost.py                 # 2 SuperNodes, 5 rounds
    python scripts/bench_message_cost.py --rounds 8 --nodes 3 --json bench.json
    python scripts/bench_message_cost.py --no-backbone-cache
    python scripts/bench_message_cost.py --run-config "model-name='ViT-B-32' pretrained=''"   # another model

docs/benchmarks.md records the figures; re-run this after changing how the ClientApp loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NOOP_APP = REPO / "scripts" / "noop_app"
BIN = Path(sys.executable).parent


def _stamp_lines(proc: subprocess.Popen[bytes], log: Path) -> None:
    """Copy a process's output to ``log``, each line prefixed with the wall-clock time it arrived."""
    assert proc.stdout is not None
    with log.open("w") as out:
        for raw in proc.stdout:
            out.write(f"{time.time():.3f} {raw.decode(errors='replace')}")
            out.flush()


# Log lines that mark a message's way through a SuperNode (Flower 1.41 wording).
RECEIVED = "Received successfully"  # supernode: the message arrived from the SuperLink
STARTED = "Start `flwr-clientapp` process"  # the new ClientApp process, once Python and Flower are loaded
REPLYING = "Sending: train message"  # supernode: the ClientApp's reply goes back


def _times(log: Path, marker: str) -> list[float]:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [float(line.split(" ", 1)[0]) for line in lines if marker in line]


def message_breakdown(work: Path, nodes: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median seconds per message, per app, from the SuperNodes' logs: until the new ClientApp
    process is up (SuperExec polling, Python and Flower start), from there to the reply (the app's
    imports, model and data, the handler), and the whole stay on the node.
    The first ``rounds`` messages of every node are pFedMMA's, the next ``rounds`` the no-op's;
    each app's first message (which also installs the app) is left out."""
    parts: dict[str, dict[str, list[float]]] = {app: {"pickup": [], "clientapp": [], "on-node": []}
                                                for app in ("pfedmma", "noop")}
    for i in range(nodes):
        received = _times(work / f"supernode-{i}.log", RECEIVED)
        started = _times(work / f"supernode-{i}-superexec.log", STARTED)
        replying = _times(work / f"supernode-{i}.log", REPLYING)
        if not len(received) == len(started) == len(replying) == 2 * rounds:
            continue  # retries or lost lines: no clean pairing on this node
        for k in range(2 * rounds):
            if k % rounds == 0:
                continue
            app = parts["pfedmma" if k < rounds else "noop"]
            app["pickup"].append(started[k] - received[k])
            app["clientapp"].append(replying[k] - started[k])
            app["on-node"].append(replying[k] - received[k])
    return {app: {name: statistics.median(v) for name, v in d.items() if v} for app, d in parts.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Deployment:
    """A SuperLink and N SuperNodes on localhost, each with its SuperExec; own FLWR_HOMEs."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    def start_all(self, nodes: int, backbone_cache: bool = True, warm_worker: bool = False) -> None:
        self.start("superlink", "link", "flower-superlink", "--insecure", "--isolation", "process",
                   "--port", str(self.port), "--disable-runtime-dependency-installation")
        self.start("superlink-superexec", "link", "flower-superexec", "--insecure",
                   "--runtime-api-address", f"127.0.0.1:{self.port}")
        for i in range(nodes):
            runtime = free_port()
            state = self.work / f"state-{i}"
            # Each node's own backbone cache, empty at the start: the first message fills it.
            cache = self.work / f"backbones-{i}" if backbone_cache else ""
            self.start(f"supernode-{i}", f"node{i}", "flower-supernode", "--insecure",
                       "--superlink", f"127.0.0.1:{self.port}", "--isolation", "process", "--port", str(runtime),
                       "--node-config", f"partition-id={i} num-partitions={nodes} state-dir='{state}' cache-dir='{cache}' "
                       f"warm-worker={'true' if warm_worker else 'false'} warm-worker-dir='{self.work / f'warm-{i}'}'")
            self.start(f"supernode-{i}-superexec", f"node{i}", "flower-superexec", "--insecure",
                       "--runtime-api-address", f"127.0.0.1:{runtime}")
        self.home("ops").joinpath("config.toml").write_text(
            f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.wait_nodes(nodes, timeout=120)

    def home(self, host: str) -> Path:
        path = self.work / "flwr-home" / host
        path.mkdir(parents=True, exist_ok=True)
        return path

    def env(self, host: str) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.home(host)),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",  # log lines are time-stamped as they arrive
        }

    def start(self, name: str, host: str, exe: str, *args: str) -> None:
        proc = subprocess.Popen([str(BIN / exe), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=self.env(host), cwd=self.work, start_new_session=True)
        self.procs.append(proc)
        threading.Thread(target=_stamp_lines, args=(proc, self.work / f"{name}.log"), daemon=True).start()

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env("ops"), cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def wait_nodes(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.flwr("supernode", "list", "bench", "--format", "json")
            # `--format json` exits 0 also on failure, with "success": false and no "nodes".
            answer = json.loads(done.stdout[done.stdout.index("{"):]) if "{" in done.stdout else {}
            if sum(node["status"] == "online" for node in answer.get("nodes", [])) >= n:
                return
            time.sleep(1)
        raise RuntimeError(f"{n} SuperNodes did not come online in {timeout:.0f}s; logs in {self.work}")

    def run(self, app: Path, run_config: str, timeout: float) -> float:
        """`flwr run APP bench --stream`; returns its wall time (the stream ends with the run)."""
        started = time.monotonic()
        done = self.flwr("run", str(app), "bench", "--stream", "--run-config", run_config, timeout=timeout)
        (self.work / f"flwr-run-{app.name}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"flwr run {app} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        return time.monotonic() - started

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the group it leads: its ServerApp/ClientApp children too
            except ProcessLookupError:
                pass
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def shared_payload(run_config: dict[str, Any]) -> tuple[int, int]:
    """(tensor count, value count) of the method's shared state for this run config."""
    sys.path.insert(0, str(REPO))
    from common.config import RunConfig
    from common.methods import method_for
    from common.model.roles import Role

    shared = method_for(RunConfig.from_flower(run_config)).initial_state()[Role.SHARED]
    return len(shared), sum(math.prod(t.shape) for t in shared.values())


IMPORTS = {
    "noop.client_app": "the no-op ClientApp: Python + Flower",
    "torch": "PyTorch",
    "open_clip": "open_clip (+ torchvision)",
    "common.data.partition": "our partitioning (datasets, flwr-datasets only when a Dirichlet split runs)",
    "client.app": "the pFedMMA ClientApp module (Flower only; the work is client.work)",
    "client.work": "the ClientApp's work, as the warm worker or the in-process path loads it",
}


def import_seconds(module: str, repeats: int = 3) -> float:
    """Median wall time of `import module` in a fresh interpreter (what every message pays first)."""
    times = []
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, check=True,
                       env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{NOOP_APP}"})
        times.append(time.monotonic() - started)
    return statistics.median(times)


BUILD = """
import json, sys, time
from pathlib import Path
from common.config import RunConfig
from common.methods import method_for
from common.model.clip import build_clip
cfg = RunConfig.from_flower(json.loads(sys.argv[1]))
started = time.monotonic()
bundle = build_clip(cfg.model_name, cfg.pretrained, "cpu", Path(sys.argv[2]) if sys.argv[2] else None, cfg.seed)
method_for(cfg).attach(bundle.model)
print(time.monotonic() - started)
"""


def build_seconds(run_config: dict[str, Any], work: Path) -> dict[str, float | None]:
    """Building the frozen model in a fresh process, after its imports: without the backbone
    cache, filling an empty cache (build and store), and from a filled cache (memory-mapped).
    None where the build could not be timed (for example after an API change)."""
    cache = work / "build-cache"
    results: dict[str, float | None] = {}
    for name, cache_arg in (("no cache", ""), ("empty cache", str(cache)), ("filled cache", str(cache))):
        done = subprocess.run([sys.executable, "-c", BUILD, json.dumps(run_config), cache_arg], cwd=REPO,
                              capture_output=True, text=True, check=False)
        try:
            results[name] = float(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            results[name] = None
            print(f"could not time the model build ({name}): {done.stderr.strip()[-500:]}", flush=True)
    return results


def wait_rows(path: Path, rounds: int, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if len(rows) >= rounds:
                return rows[:rounds]
        time.sleep(0.5)
    raise RuntimeError(f"{path}: fewer than {rounds} rounds after {timeout:.0f}s")


def check_replies(app: str, rows: list[dict[str, Any]], nodes: int) -> None:
    """Every round must have had a valid reply from every node: a round of error replies is fast
    and would make the figures meaningless."""
    bad = [r for r in rows if r.get("valid-replies") != nodes]
    if bad:
        reasons = {reason for r in bad for reason in r.get("rejections", {}).values()}
        raise SystemExit(f"{app}: rounds {[r['round'] for r in bad]} had fewer than {nodes} valid replies; "
                         f"no figures. Reasons: {sorted(reasons) or 'see the logs (--keep)'}")


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def parse_overrides(text: str) -> dict[str, Any]:
    """``--run-config`` text read the way `flwr run --run-config` reads it."""
    from flwr.common.config import parse_config_args

    return dict(parse_config_args([text])) if text.strip() else {}


def measure(work: Path, args: argparse.Namespace, ours_cfg: str, noop_cfg: str, warm: bool) -> dict[str, Any]:
    """pFedMMA then the no-op app in one fresh deployment; per-round seconds, walls, breakdown."""
    work.mkdir(parents=True)
    deployment = Deployment(work)
    try:
        deployment.start_all(args.nodes, backbone_cache=not args.no_backbone_cache, warm_worker=warm)
        print(f"running pFedMMA for {args.rounds} rounds on {args.nodes} SuperNodes, warm worker {'on' if warm else 'off'} ...",
              flush=True)
        ours_wall = deployment.run(REPO, ours_cfg, args.timeout)
        (run_dir,) = (work / "runs").iterdir()
        ours_rows = wait_rows(run_dir / "metrics.jsonl", args.rounds, 120)
        check_replies("pFedMMA", ours_rows, args.nodes)
        ours = [float(r["seconds"]) for r in ours_rows]
        print(f"running the no-op app for {args.rounds} rounds ...", flush=True)
        noop_wall = deployment.run(NOOP_APP, noop_cfg, args.timeout)
        noop_rows = wait_rows(work / "noop-times.jsonl", args.rounds, 120)
        check_replies("no-op", noop_rows, args.nodes)
        noop = [float(r["seconds"]) for r in noop_rows]
    finally:
        deployment.close()
    steady = slice(1, None) if args.rounds > 1 else slice(None)  # round 1 also installs the app on each node
    mean_ours, mean_noop = statistics.mean(ours[steady]), statistics.mean(noop[steady])
    return {
        "pfedmma-seconds": ours, "noop-seconds": noop, "mean-steady": {"pfedmma": mean_ours, "noop": mean_noop},
        "ratio": mean_ours / mean_noop, "difference": mean_ours - mean_noop,
        "wall": {"pfedmma": ours_wall, "noop": noop_wall}, "per-message": message_breakdown(work, args.nodes, args.rounds),
    }


def report(label: str, result: dict[str, Any], rounds: int) -> None:
    ours, noop = result["pfedmma-seconds"], result["noop-seconds"]
    mean_ours, mean_noop = result["mean-steady"]["pfedmma"], result["mean-steady"]["noop"]
    print()
    print(f"pFedMMA {label}:")
    print("| round | pFedMMA (s) | no-op (s) | difference (s) |")
    print("|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(ours, noop, strict=True), start=1):
        print(f"| {i} | {a:.2f} | {b:.2f} | {a - b:.2f} |")
    span = f"rounds 2..{rounds}" if rounds > 1 else "mean"
    print(f"| **mean, {span}** | **{mean_ours:.2f}** | **{mean_noop:.2f}** | **{mean_ours - mean_noop:.2f}** |")
    print(f"ratio pFedMMA / no-op: {result['ratio']:.2f}x; above the floor: {result['difference']:.2f} s per round")
    print(f"whole runs (flwr run, submit to end of stream): pFedMMA {result['wall']['pfedmma']:.1f} s, "
          f"no-op {result['wall']['noop']:.1f} s")
    breakdown = result["per-message"]
    if all(breakdown.values()):
        print("per message on a SuperNode (median, first message left out):")
        print("| | until the ClientApp process is up (s) | from there to the reply (s) | on the node in all (s) |")
        print("|---|---:|---:|---:|")
        for app, name in (("pfedmma", "pFedMMA"), ("noop", "no-op")):
            part = breakdown[app]
            print(f"| {name} | {part['pickup']:.2f} | {part['clientapp']:.2f} | {part['on-node']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per app (default 5)")
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes (default 2)")
    # The workload is pinned (not left to pyproject's defaults) so that re-runs stay comparable.
    parser.add_argument("--run-config", default="shots=4 test-per-class=2 local-epochs=1 batch-size=32",
                        help="extra pFedMMA run config, TOML key=value pairs separated by spaces "
                             "(default: 4 shapes images per class, one local epoch, the default model)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, run directory)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per app run")
    parser.add_argument("--paths", nargs="+", choices=("in-process", "warm"), default=["in-process", "warm"],
                        help="which ClientApp paths to measure, each in its own deployment with its own no-op run")
    parser.add_argument("--no-backbone-cache", action="store_true",
                        help="node config cache-dir='': every message builds the backbone instead of memory-mapping it")
    args = parser.parse_args()

    with open(REPO / "pyproject.toml", "rb") as f:
        defaults = dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    overrides = parse_overrides(args.run_config)
    num_tensors, num_values = shared_payload({**defaults, **overrides})

    work = Path(tempfile.mkdtemp(prefix="bench-message-cost-"))
    ours_cfg = (f"num-server-rounds={args.rounds} fraction-evaluate=0.0 min-evaluate-nodes=0 eval-every=0 "
                f"min-train-nodes={args.nodes} min-available-nodes={args.nodes} "
                f"output-dir='{work / 'runs'}' {args.run_config}")
    noop_cfg = (f"num-server-rounds={args.rounds} num-tensors={num_tensors} num-values={num_values} "
                f"min-nodes={args.nodes} times-file='{work / 'noop-times.jsonl'}'")
    print(f"machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}; load average {load()} before; work dir {work}", flush=True)
    resolved = {**defaults, **overrides}
    print(f"pFedMMA: model-name={resolved['model-name']!r} pretrained={resolved['pretrained']!r}, "
          f"{args.nodes} SuperNodes, train-only rounds; extra run config: {args.run_config!r}; backbone cache "
          f"{'off' if args.no_backbone_cache else 'on (one per node)'}", flush=True)
    print(f"payload: {num_tensors} shared tensors, {num_values:,} float32 values ({num_values * 4 / 1024:.1f} KiB)",
          flush=True)

    results = {}
    for path in args.paths:
        label = {"in-process": "in the ClientApp process (warm-worker=false)", "warm": "with the warm worker"}[path]
        results[path] = measure(work / path, args, ours_cfg.replace(str(work / "runs"), str(work / path / "runs")),
                                noop_cfg.replace(str(work), str(work / path)), warm=path == "warm")
        report(label, results[path], args.rounds)
    # What a fresh ClientApp process pays before its handler runs (each figure includes the ones above it).
    imports = {module: import_seconds(module) for module in IMPORTS}
    builds = build_seconds(resolved, work)
    print()
    print("fresh-interpreter import times (median of 3):")
    for module, seconds in imports.items():
        print(f"  import {module:<20} {seconds:6.2f} s  ({IMPORTS[module]})")
    print()
    print(f"building {resolved['model-name']} in a fresh process, after the imports:")
    for name, built in builds.items():
        shown = "n/a" if built is None else f"{built:6.2f} s"
        print(f"  {name:<13} {shown}")
    print()
    print(f"load average after: {load()} (other work on the machine inflates every figure)")
    for path, result in results.items():
        print(f"ratio pFedMMA / no-op, {path}: {result['ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({
            "cpu-cores": os.cpu_count(), "nodes": args.nodes, "backbone-cache": not args.no_backbone_cache,
            "rounds": args.rounds, "run-config": args.run_config, "payload-values": num_values,
            "paths": results, "import-seconds": imports, "build-seconds": builds,
        }, indent=2) + "\n")
    if args.keep:
        print(f"logs and run directory kept in {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
