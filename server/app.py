"""The pFedMMA ServerApp: seeds (or resumes) the global shared projections, runs the rounds,
writes results."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.arrays import to_record
from common.config import RunConfig
from common.mma_model import initial_adapter_state
from common.roles import Role
from server.partition_record import PartitionRecorder
from server.progress import RoundReporter
from server.run_dir import ResumeError, RunDirectory
from server.strategy import PFedMMA
from server.validation import specs_of

log = logging.getLogger(__name__)

app = ServerApp()

# Settings a resumed run must share with the run it continues.
RESUME_MUST_MATCH = (
    "model-name", "pretrained", "adapter-start", "adapter-end", "adapter-rank", "adapter-alpha", "seed",
    "dataset", "dataset-domains", "partition", "shots", "dirichlet-beta", "classes-per-client",
)


def _open_run(cfg: RunConfig, run_id: int, initial: ArrayRecord) -> tuple[RunDirectory, ArrayRecord, int]:
    """The run directory, the global state to start from and the rounds already done."""
    if not cfg.resume_from:
        namespace = cfg.experiment_name or f"run-{run_id}"
        return RunDirectory.create(Path(cfg.output_dir), run_id, cfg.to_flower(), namespace), initial, 0
    run_dir = RunDirectory.resume(Path(cfg.resume_from), run_id, cfg.to_flower(), RESUME_MUST_MATCH)
    done = run_dir.last_completed_round()
    if done >= cfg.num_server_rounds:
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


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config)
    # Only the shared projections ever exist on the server; they start from the same seed
    # that every client uses for its own initial adapters.
    initial = to_record(initial_adapter_state(cfg)[Role.SHARED])
    run_dir, start_arrays, done = _open_run(cfg, context.run_id, initial)
    strategy = PFedMMA(
        specs_of(initial),
        num_rounds=cfg.num_server_rounds,
        eval_every=cfg.eval_every,
        round_offset=done,
        # Clients keep private adapters under this name, so a resumed run finds them again.
        client_config={"state-namespace": run_dir.run_info()["state-namespace"]},
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
    )
    num_shared = sum(math.prod(a.shape) for a in initial.values())
    print(f"[pfedmma] run {context.run_id}: rounds {done + 1}..{cfg.num_server_rounds}, {cfg.model_name}, "
          f"{len(initial)} shared tensors ({num_shared:,} values); writing {run_dir.path}", flush=True)
    reporter = RoundReporter(strategy, run_dir, cfg.num_server_rounds, cfg.model_selection, run_dir.completed_rounds())
    partition = PartitionRecorder(cfg, strategy, run_dir)

    def end_round(loop_round, arrays):  # type: ignore[no-untyped-def]
        partition.maybe_record(strategy.real_round(loop_round) if loop_round else 0)
        return reporter.end_round(loop_round, arrays)

    strategy.start(
        grid=grid,
        initial_arrays=start_arrays,
        num_rounds=cfg.num_server_rounds - done,
        timeout=cfg.round_timeout,
        evaluate_fn=end_round,
    )
    reporter.finish()
