"""``pfedmma-compare`` (or ``python -m server.compare``): run a preset for every method and
seed through Flower, skip what is already done, then write the table and the plots.

    pfedmma-compare --preset conf/miniature.toml --methods all --seeds 0,1,2 --out results/miniature
    pfedmma-compare --preset conf/miniature.toml --connection local-deployment --server-output-dir /results/cmp ...

Simulation starts `flwr run APP --federation-config num-supernodes=N`; with ``--connection``
every run goes to that SuperLink instead (the ServerApp must write to ``--server-output-dir``,
which must be this folder's ``runs/`` on shared or mounted storage). A run that fails is
reported and the others go on; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from server.compare.plan import PlanError, PlannedRun, plan_runs, read_preset
from server.compare.plots import plot_curves, plot_tradeoff
from server.compare.results import MethodResult, SeedResult, write_tables
from server.compare.runner import Target, execute, write_record

REPO = Path(__file__).resolve().parents[2]


def _methods(text: str) -> list[str]:
    from common.methods import METHODS

    names = list(METHODS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--methods {text!r}: unknown {unknown}; valid: all, or a comma list of {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected comma-separated non-negative integers, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected comma-separated non-negative integers, e.g. 0,1,2")
    return list(dict.fromkeys(seeds))


def _overrides(pairs: Sequence[str]) -> dict:
    import tomllib

    values: dict = {}
    for pair in pairs:
        try:
            values.update(tomllib.loads(pair))
        except tomllib.TOMLDecodeError:
            raise argparse.ArgumentTypeError(f"--set {pair!r}: expected key=value in TOML, e.g. num-server-rounds=10 or dataset-domains='solid'") from None
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pfedmma-compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", type=Path, required=True, help="a run-config TOML from conf/ (e.g. conf/miniature.toml)")
    p.add_argument("--methods", type=_methods, default=_methods("all"), help="'all' or a comma list (default: all)")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma list (default: 0,1,2)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/<preset name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override on top of the preset (repeatable)")
    p.add_argument("--supernodes", type=int, default=None,
                   help="simulated clients (default: the preset's min-available-nodes, at least 4)")
    p.add_argument("--gpus-per-client", type=float, default=None,
                   help="simulation: each client's GPU share, e.g. 0.25 = four clients per GPU (default: chosen "
                        "from the GPUs this machine has, at most four clients per GPU; 0 without CUDA)")
    p.add_argument("--connection", default="", help="a SuperLink connection name: run against that deployment")
    p.add_argument("--server-output-dir", default="", help="with --connection: this folder's runs/ as the ServerApp sees it")
    p.add_argument("--app", type=Path, default=REPO, help="the Flower app (default: this repository)")
    p.add_argument("--force", action="store_true", help="re-run finished runs too")
    p.add_argument("--report-only", action="store_true", help="run nothing; tabulate the finished runs")
    args = p.parse_args(argv)
    try:
        args.set = _overrides(args.set)
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    if args.supernodes is not None and args.supernodes < 1:
        p.error(f"--supernodes={args.supernodes}: need at least 1")
    if args.gpus_per_client is not None and not 0.0 <= args.gpus_per_client <= 64:
        p.error(f"--gpus-per-client={args.gpus_per_client}: expected a share between 0 and the GPUs of the machine (e.g. 0.25)")
    if args.gpus_per_client is not None and args.connection:
        p.error("--gpus-per-client only applies in simulation; a deployment's clients use their own GPUs")
    if args.server_output_dir and not args.connection:
        p.error("--server-output-dir only applies with --connection (a deployment)")
    args.out = args.out or Path("results") / args.preset.stem
    return args


def _print(line: str) -> None:
    print(line, flush=True)


def _prefixed(tag: str) -> Callable[[str], None]:
    return lambda line: _print(f"{tag} {line}")


def run_all(args: argparse.Namespace, runs: list[PlannedRun]) -> tuple[dict[tuple[str, int], SeedResult], list[str]]:
    target = Target(args.app, args.supernodes, args.connection, args.server_output_dir, args.gpus_per_client or 0.0)
    runs_root = args.out / "runs"
    state_dir = None if args.connection else args.out / "state"
    finished: dict[tuple[str, int], SeedResult] = {}
    failures: list[str] = []
    started = time.monotonic()
    for i, run in enumerate(runs, start=1):
        tag = f"[compare {i}/{len(runs)} {run.label}]"
        done = None if args.force else run.completed_dir()
        if done is not None:
            record = run.record() or {}
            finished[(run.method, run.seed)] = SeedResult.read(run.seed, done, float(record.get("wall-seconds", 0.0)))
            _print(f"{tag} already complete: {done}")
            continue
        if args.report_only:
            _print(f"{tag} not run yet")
            continue
        if run.folder.exists():
            _print(f"{tag} discarding an unfinished attempt in {run.folder}" if not args.force else f"{tag} --force: replacing {run.folder}")
            run.clear()
        command = target.command(run, runs_root, state_dir)
        _print(f"{tag} starting")
        outcome = execute(run, command, _prefixed(tag))
        write_record(run, command, outcome)
        if outcome.run_dir is None:
            failures.append(f"{run.label}: {outcome.message}")
            _print(f"{tag} FAILED: {outcome.message}")
            continue
        result = SeedResult.read(run.seed, outcome.run_dir, outcome.seconds)
        finished[(run.method, run.seed)] = result
        elapsed = time.monotonic() - started
        hm3 = result.evaluation.get("hm3")
        _print(f"{tag} done in {outcome.seconds:.0f} s" + (f", HM3 {100 * hm3:.2f}" if hm3 is not None else "") + f" ({elapsed / 60:.1f} min so far)")
    return finished, failures


MINIATURE_CLIENTS = 4  # the offline miniature's federation, when a preset asks for fewer nodes


def federation_size(args: argparse.Namespace, run_config: dict) -> str:
    """Fill in ``--supernodes`` (from the preset's node minimums) and ``--gpus-per-client`` (from
    this machine's GPUs); refuse a federation smaller than the preset needs, which would wait."""
    needed = max(int(run_config.get(k, 1)) for k in ("min-available-nodes", "min-train-nodes", "min-evaluate-nodes"))
    if args.connection:
        return ""
    if args.supernodes is None:
        args.supernodes = max(needed, MINIATURE_CLIENTS)
    elif args.supernodes < needed:
        raise PlanError(f"--supernodes={args.supernodes} is below the preset's min-available-nodes={needed}: every "
                        f"run would wait for nodes that never come; pass --supernodes {needed} or more, or lower "
                        f"min-available-nodes with --set")
    if args.gpus_per_client is None:
        from common.device import gpus_per_client  # imports torch: only here, where it decides something

        args.gpus_per_client = gpus_per_client(args.supernodes)
    gpus = f", {args.gpus_per_client:g} GPU each" if args.gpus_per_client else ", CPU only"
    return f"simulation, {args.supernodes} clients{gpus}"


def report(args: argparse.Namespace, methods: list[str], seeds: list[int], finished: dict[tuple[str, int], SeedResult]) -> None:
    results = []
    for method in methods:
        per_seed = [finished[(method, s)] for s in seeds if (method, s) in finished]
        if per_seed:
            results.append(MethodResult(method, per_seed))
    if not results:
        _print("[compare] no finished run to tabulate")
        return
    header = {
        "preset": str(args.preset),
        "overrides": args.set,
        "seeds": seeds,
        "supernodes": None if args.connection else args.supernodes,
        "gpus-per-client": None if args.connection else args.gpus_per_client,
        "connection": args.connection or None,
    }
    paths = write_tables(results, args.out, header)
    paths["curves"] = plot_curves(results, args.out / "curves.png")
    paths["tradeoff"] = plot_tradeoff(results, args.out / "local_vs_novel.png")
    _print((args.out / "table.md").read_text())
    _print("[compare] wrote " + ", ".join(str(p) for p in paths.values()))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        preset = read_preset(args.preset)
        runs = plan_runs(args.out, preset, args.methods, args.seeds, args.set)
        federation = federation_size(args, runs[0].run_config) if runs else ""
        _print(f"[compare] {len(args.methods)} methods x {len(args.seeds)} seeds = {len(runs)} runs of {args.preset} "
               f"({'connection ' + args.connection if args.connection else federation}); results in {args.out}")
        finished, failures = run_all(args, runs)
    except PlanError as err:
        print(f"pfedmma-compare: {err}", file=sys.stderr)
        return 2
    report(args, args.methods, args.seeds, finished)
    if args.out.is_dir():
        (args.out / "compare.json").write_text(json.dumps({"argv": sys.argv[1:], "failures": failures}, indent=2) + "\n")
    if failures:
        _print("[compare] failed runs:\n" + "\n".join(f"  {f}" for f in failures))
        return 1
    return 0
