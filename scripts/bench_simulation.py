"""Flower simulation's per-round wall time against the same clients' compute in one process.

    python scripts/bench_simulation.py                      # 8 clients, 4 rounds, the miniature preset
    python scripts/bench_simulation.py --clients 8 --rounds 4 --run-config "method='promptfl'"

1. ``flwr run .`` in simulation (a private local SuperLink, own FLWR_HOME and ports) with N
   virtual clients, train + full evaluation every round; per-round times come from the run's
   metrics.jsonl ("seconds": end of round to end of round).
2. The same N clients, the same config, called in this process: every round each client's
   ClientApp handles a real train Message, the replies' shared tensors are averaged (weighted
   by examples, as FedAvg), and each client handles an evaluate Message; the round's time is
   the sum of those calls.

Rounds after the first are compared (the first pays model build and image decoding in both).
The ratio is Flower's simulation overhead: Ray actors, message (de)serialisation, the
ServerApp's strategy and bookkeeping, and the run directory's files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.local_superlink import FLWR, flower_env, stop_processes_under


def _default_config() -> dict[str, Any]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def _flower_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"'{value}'" if isinstance(value, str) else str(value)


def _parse_overrides(text: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in text.split():
        key, raw = item.split("=", 1)
        values[key] = tomllib.loads(f"v = {raw}")["v"]
    return values


def simulate(config: dict[str, Any], clients: int, work: Path, gpus: float | None = None) -> tuple[list[float], float]:
    """``gpus``: each client's GPU share; None = chosen from this machine's GPUs (none: CPU)."""
    from common.device import simulation_resources

    home = work / "flwr-home"
    home.mkdir()
    run_config = " ".join(f"{k}={_flower_value(v)}" for k, v in config.items())
    federation = f"num-supernodes={clients} {simulation_resources(clients, gpus)}".strip()
    started = time.monotonic()
    try:
        done = subprocess.run(
            [FLWR, "run", ".", "--stream", "--federation-config", federation, "--run-config", run_config],
            cwd=REPO, env=flower_env(home), capture_output=True, text=True, timeout=3600, check=False,
        )
    finally:
        stop_processes_under(home)
    wall = time.monotonic() - started
    found = sorted(Path(config["output-dir"]).rglob("metrics.jsonl"))
    if done.returncode != 0 or not found:
        sys.exit(f"the simulation failed (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in found[0].read_text().splitlines() if line.strip()]
    rounds = [r for r in rows if "seconds" in r and r.get("round")]
    if len(rounds) < config["num-server-rounds"]:
        sys.exit(f"the simulation logged {len(rounds)} of {config['num-server-rounds']} rounds:\n{done.stdout[-3000:]}")
    return [float(r["seconds"]) for r in rounds], wall


def in_process(config: dict[str, Any], clients: int) -> list[dict[str, float]]:
    """Every client's train and evaluate handler called here, round after round."""
    from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

    from client.app import app
    from common.arrays import from_record, to_record
    from common.config import RunConfig
    from common.methods import method_for
    from common.model.roles import Role

    method = method_for(RunConfig.from_flower(config))
    shared = method.initial_state()[Role.SHARED]

    def message(kind: str, server_round: int, node: int, content: RecordDict) -> Message:
        metadata = Metadata(
            run_id=7, message_id=f"{kind}-{server_round}-{node}", src_node_id=1, dst_node_id=node, reply_to_message_id="",
            group_id=str(server_round), created_at=time.time(), ttl=3600.0, message_type=kind,
        )
        return Message(content=content, metadata=metadata)

    contexts = [
        Context(run_id=7, node_id=100 + i, node_config={"partition-id": i, "num-partitions": clients, "warm-worker": False},
                state=RecordDict(), run_config=dict(config))
        for i in range(clients)
    ]
    times = []
    for server_round in range(1, config["num-server-rounds"] + 1):
        settings = {"server-round": server_round, "full-eval": True, "state-namespace": "bench-in-process"}
        start = time.perf_counter()
        replies = []
        for i, ctx in enumerate(contexts):
            content = RecordDict({"arrays": to_record(shared), "config": ConfigRecord(settings)})
            replies.append(app(message("train", server_round, 100 + i, content), ctx))
        if shared:
            weights = [float(r.content.metric_records["metrics"]["num-examples"]) for r in replies]
            states = [from_record(r.content.array_records["arrays"]) for r in replies]
            shared = {k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / sum(weights) for k in shared}
        trained = time.perf_counter()
        for i, ctx in enumerate(contexts):
            content = RecordDict({"arrays": to_record(shared), "config": ConfigRecord(settings)})
            reply = app(message("evaluate", server_round, 100 + i, content), ctx)
            if reply.has_error():
                sys.exit(f"in-process evaluate failed: {reply.error.reason}")
        done = time.perf_counter()
        times.append({"train": trained - start, "evaluate": done - trained, "round": done - start})
        print(f"in-process round {server_round}: train {trained - start:.2f}s, evaluate {done - trained:.2f}s", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--run-config", default="", help="overrides, as flwr run takes them")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--gpus-per-client", type=float, default=None,
                        help="each simulated client's GPU share (default: from this machine's GPUs; 0 = CPU)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds: at least 2 (the first round is left out of the means)")
    work = Path(tempfile.mkdtemp(prefix="bench-simulation-"))
    config = {
        **_default_config(), **_parse_overrides(args.run_config),
        "num-server-rounds": args.rounds, "min-train-nodes": args.clients, "min-evaluate-nodes": args.clients,
        "min-available-nodes": args.clients, "eval-every": 1,
        "output-dir": str(work / "runs"), "state-dir": str(work / "state"), "experiment-name": "bench-simulation",
    }
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {args.clients} clients, {args.rounds} rounds, "
          f"method {config['method']}, model {config['model-name']}", flush=True)
    try:
        simulated, wall = simulate(config, args.clients, work, args.gpus_per_client)
        for i, seconds in enumerate(simulated, 1):
            print(f"simulation round {i}: {seconds:.2f}s", flush=True)
        shutil.rmtree(work / "state", ignore_errors=True)
        local = in_process({**config, "state-dir": str(work / "state-in-process")}, args.clients)
    finally:
        load_after = os.getloadavg()[0]
        shutil.rmtree(work, ignore_errors=True)
    sim_mean = statistics.mean(simulated[1:])
    local_mean = statistics.mean(t["round"] for t in local[1:])
    eval_share = statistics.mean(t["evaluate"] / t["round"] for t in local[1:])
    print(f"load average after: {load_after:.2f}; whole simulation {wall:.1f}s (with start-up)")
    print(f"per round, rounds 2..{args.rounds}: simulation {sim_mean:.2f}s, in-process compute {local_mean:.2f}s "
          f"(evaluation {eval_share:.0%} of it)")
    print(f"simulation overhead: {sim_mean / local_mean:.2f}x the in-process compute")
    if args.json:
        args.json.write_text(json.dumps({"simulation": simulated, "in-process": local, "wall": wall}, indent=1))


if __name__ == "__main__":
    main()
