"""The pFedMMA ServerApp: seeds the global shared projections, runs the rounds, writes results."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.arrays import to_record
from common.config import RunConfig
from common.mma_model import initial_adapter_state
from common.roles import Role
from server.partition_record import PartitionRecorder
from server.progress import RoundReporter
from server.run_dir import RunDirectory
from server.strategy import PFedMMA
from server.validation import specs_of

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config)
    # Only the shared projections ever exist on the server; they start from the same seed
    # that every client uses for its own initial adapters.
    initial = to_record(initial_adapter_state(cfg)[Role.SHARED])
    strategy = PFedMMA(
        specs_of(initial),
        num_rounds=cfg.num_server_rounds,
        eval_every=cfg.eval_every,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
    )
    run_dir = RunDirectory(Path(cfg.output_dir), context.run_id, cfg.to_flower())
    num_shared = sum(math.prod(a.shape) for a in initial.values())
    print(f"[pfedmma] run {context.run_id}: {cfg.num_server_rounds} rounds, {cfg.model_name}, "
          f"{len(initial)} shared tensors ({num_shared:,} values); writing {run_dir.path}", flush=True)
    reporter = RoundReporter(strategy, run_dir, cfg.num_server_rounds, cfg.model_selection)
    partition = PartitionRecorder(cfg, strategy, run_dir)

    def end_round(server_round, arrays):  # type: ignore[no-untyped-def]
        partition.maybe_record(server_round)
        return reporter.end_round(server_round, arrays)

    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        evaluate_fn=end_round,
    )
    reporter.finish()
