"""The ServerApp, one for every method: seeds (or resumes) the method's global shared tensors,
runs the rounds with the method's strategy, writes results."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.arrays import to_record
from common.config import ConfigError, RunConfig
from common.data.federated import partition_for
from common.errors import DiskFullError, is_disk_full
from common.methods import Method, method_for
from common.model.clip import backbone_parameter_count
from common.model.roles import Role
from server.aggregation import PrivacyBudgetSpent
from server.node_wait import NodesMissing, wait_for_nodes
from server.partition_record import PartitionRecorder
from server.preflight import data_on_server, preflight
from server.progress import RoundReporter, RunFailed
from server.run_dir import ResumeError, RunDirectory
from server.strategies import STRATEGIES
from server.validation import DEFAULT_MAX_EXAMPLES, specs_of

log = logging.getLogger(__name__)

app = ServerApp()

# Settings a resumed run must share with the run it continues (the method adds its model keys).
RESUME_MUST_MATCH = (
    "method", "model-name", "pretrained", "seed",
    "dataset", "dataset-domains", "partition", "shots", "dirichlet-beta", "classes-per-client",
)


def _open_run(cfg: RunConfig, method: Method, run_id: int, initial: ArrayRecord, num_rounds: int) -> tuple[RunDirectory, ArrayRecord, int]:
    """The run directory, the global state to start from and the rounds already done."""
    if not cfg.resume_from:
        namespace = cfg.experiment_name or f"run-{run_id}"
        return RunDirectory.create(Path(cfg.output_dir), run_id, cfg.to_flower(), namespace), initial, 0
    must_match = (*RESUME_MUST_MATCH, *method.model_keys)
    run_dir = RunDirectory.resume(Path(cfg.resume_from), run_id, cfg.to_flower(), must_match)
    done = run_dir.last_completed_round()
    if done >= num_rounds:
        raise ResumeError(
            f"resume-from={cfg.resume_from!r} already completed {done} rounds; "
            f"num-server-rounds={cfg.num_server_rounds} leaves nothing to run (raise it to continue)"
        )
    if done == 0:
        return run_dir, initial, 0
    restored = to_record(run_dir.load_global(done))
    if specs_of(restored) != specs_of(initial):
        raise ResumeError(f"{run_dir.global_path(done)} does not match this model's shared tensors")
    print(f"[pfedmma] resuming {run_dir.path} after round {done}", flush=True)
    return run_dir, restored, done


def earlier_runs(run_dir: RunDirectory, run_id: int) -> str:
    """The runs this one continues ("12,34"): clients let a resumed run take over their lock."""
    info = run_dir.run_info()
    runs = [info["run-id"], *(r["run-id"] for r in info.get("resumed-by", []))]
    return ",".join(str(r) for r in runs if r != run_id)


def examples_cap(cfg: RunConfig, num_nodes: int) -> tuple[int, str]:
    """The largest num-examples a training reply may report when max-examples is 0: the largest
    training shard of the partition, which every client derives from the seed and the server can
    too when it reads the data; else a fixed bound."""
    if data_on_server(cfg):
        try:
            partition = partition_for(cfg, num_nodes)
            return max(len(c.train_indices) for c in partition.clients), f"the largest shard of {num_nodes} clients"
        except (OSError, ValueError) as err:
            log.warning("num-examples cap: the partition is not readable on the server (%s)", err)
    return DEFAULT_MAX_EXAMPLES, "the server cannot read the partition; set max-examples to bound it"


def method_record(cfg: RunConfig, method: Method, initial: dict[Role, dict[str, Any]]) -> dict[str, Any]:
    """What the run directory says about the method: settings, parameter counts, tensors by role."""
    counts = {role.value: sum(math.prod(t.shape) for t in initial[role].values()) for role in (Role.SHARED, Role.PRIVATE)}
    return {
        "method": method.name,
        "summary": method.summary,
        "strategy": method.strategy,
        "settings": method.settings(),
        "parameters": {
            "trainable-per-client": counts["shared"] + counts["private"],
            "shared": counts["shared"],
            "private": counts["private"],
            "frozen": backbone_parameter_count(cfg.model_name),
        },
        "tensors": {
            role.value: {name: list(t.shape) for name, t in sorted(initial[role].items())} for role in (Role.SHARED, Role.PRIVATE)
        },
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = RunConfig.from_flower(context.run_config)
        nodes = wait_for_nodes(grid, cfg.min_available_nodes, cfg.node_wait_timeout)
        preflight(cfg, len(nodes) or None)
    except (ConfigError, NodesMissing) as err:
        # Returned, not raised: Flower would print its traceback twice after these lines.
        lines = str(err).splitlines()
        print(f"[pfedmma] FAILED before round 1: {lines[0]}", flush=True)
        for line in lines[1:]:
            print(f"[pfedmma]   {line.strip()}", flush=True)
        return
    try:
        run(cfg, grid, context)
    except OSError as err:
        if not is_disk_full(err):
            raise
        # A DiskFullError from the run directory names the file, output-dir and the resume-from to use.
        detail = str(err) if isinstance(err, DiskFullError) else f"no space left on the device to write {err.filename or cfg.output_dir}"
        print(f"[pfedmma] FAILED: {detail}", flush=True)


def run(cfg: RunConfig, grid: Grid, context: Context) -> None:
    """Seed or resume the global state, run the rounds, write the results."""
    method = method_for(cfg)
    # Only the shared tensors ever exist on the server; they start from the same seed that
    # every client uses for its own initial private tensors.
    initial_state = method.initial_state()
    initial = to_record(initial_state[Role.SHARED])
    # A method that trains nothing has one evaluation to make, not num-server-rounds equal ones.
    num_rounds = cfg.num_server_rounds if method.trains else 1
    run_dir, start_arrays, done = _open_run(cfg, method, context.run_id, initial, num_rounds)
    strategy = STRATEGIES[method.strategy].from_config(
        cfg,
        specs_of(initial),
        num_rounds=num_rounds,
        eval_every=cfg.eval_every,
        round_offset=done,
        # Clients keep private tensors under this name, so a resumed run finds them again.
        client_config={"state-namespace": run_dir.run_info()["state-namespace"], "state-owners": earlier_runs(run_dir, context.run_id)},
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
        examples_cap=None if cfg.max_examples else (lambda n: examples_cap(cfg, n)),
    )
    if done:
        strategy.load_server_state(*run_dir.load_server_state(done))
        # Clients whose training was accepted before the resume still count as trained.
        strategy.trained.update(int(c) for row in run_dir.completed_rounds() for c in row.get("private-source", {}) if int(c) >= 0)
    record = method_record(cfg, method, initial_state)
    run_dir.write_method(record)
    params = record["parameters"]
    print(f"[pfedmma] run {context.run_id}: method {method.name} ({method.summary}); rounds {done + 1}..{num_rounds}, "
          f"{cfg.model_name}; per client {params['trainable-per-client']:,} trainable = {params['shared']:,} shared "
          f"+ {params['private']:,} private ({params['frozen']:,} frozen); writing {run_dir.path}", flush=True)
    robust = f"aggregation {cfg.aggregation}" + (f", DP {cfg.dp} (noise multiplier {cfg.dp_noise_multiplier:g})" if cfg.dp != "off" else "")
    bound = f"update norm <= {cfg.update_norm_bound:g}x the global's ({cfg.update_norm_action})" if cfg.update_norm_bound else "no update-norm bound"
    print(f"[pfedmma] {robust}; {bound}; num-examples cap {cfg.max_examples or 'from the partition'}", flush=True)
    if not method.trains and cfg.num_server_rounds != 1:
        print(f"[pfedmma] {method.name} trains nothing: one evaluation round instead of {cfg.num_server_rounds}", flush=True)
    reporter = RoundReporter(strategy, run_dir, num_rounds, cfg.model_selection, run_dir.completed_rounds(), record)
    partition = PartitionRecorder(cfg, strategy, run_dir)

    def end_round(loop_round, arrays):  # type: ignore[no-untyped-def]
        partition.maybe_record(strategy.real_round(loop_round) if loop_round else 0)
        return reporter.end_round(loop_round, arrays)

    try:
        strategy.start(
            grid=grid,
            initial_arrays=start_arrays,
            num_rounds=num_rounds - done,
            timeout=cfg.round_timeout,
            evaluate_fn=end_round,
        )
    except RunFailed as failed:
        # Not re-raised: Flower would print its traceback twice after our summary lines. The
        # final line and summary.json say "failed".
        reporter.finish(failed)
        return
    except (PrivacyBudgetSpent, NodesMissing) as stopped:  # raised before a round's instructions are sent
        reporter.finish(RunFailed(reporter.history[-1]["round"] if reporter.history else done, str(stopped), {}))
        return
    reporter.finish()
