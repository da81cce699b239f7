"""The no-op ServerApp: Flower's FedAvg loop (train only) over a payload of a given size,
recording each round's wall time the way pFedMMA's run directory does (end to end of rounds)
and how many replies came back without an error."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class CountingFedAvg(FedAvg):
    """FedAvg that remembers how many replies of the last round were not errors."""

    valid = 0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.valid = sum(not msg.has_error() for msg in replies)
        return super().aggregate_train(server_round, replies)


def payload(num_tensors: int, num_values: int) -> ArrayRecord:
    sizes = [num_values // num_tensors + (i < num_values % num_tensors) for i in range(num_tensors)]
    return ArrayRecord({f"t{i}": Array(np.zeros(n, dtype=np.float32)) for i, n in enumerate(sizes)})


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    times_file = Path(str(cfg["times-file"])) if cfg["times-file"] else None
    min_nodes = int(cfg["min-nodes"])
    strategy = CountingFedAvg(fraction_evaluate=0.0, min_train_nodes=min_nodes, min_available_nodes=min_nodes)
    last = time.monotonic()

    def end_round(server_round: int, arrays: ArrayRecord) -> None:
        nonlocal last
        now = time.monotonic()
        if server_round > 0:
            row = {"round": server_round, "seconds": round(now - last, 3), "valid-replies": strategy.valid}
            print(f"[noop] round {server_round}: {row['seconds']:.2f}s, {strategy.valid} replies", flush=True)
            if times_file is not None:
                with times_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        last = now

    strategy.start(
        grid=grid,
        initial_arrays=payload(int(cfg["num-tensors"]), int(cfg["num-values"])),
        num_rounds=int(cfg["num-server-rounds"]),
        evaluate_fn=end_round,
    )
