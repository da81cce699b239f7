"""End-of-round bookkeeping: one printed line, one metrics row, one global checkpoint."""

from __future__ import annotations

import time
from typing import Any

from flwr.app import ArrayRecord, MetricRecord

from common.arrays import from_record
from server.run_dir import RunDirectory
from server.strategy import PFedMMA


class RoundReporter:
    """Called by the strategy loop after each round (as its ``evaluate_fn``)."""

    def __init__(self, strategy: PFedMMA, run_dir: RunDirectory, num_rounds: int) -> None:
        self.strategy = strategy
        self.run_dir = run_dir
        self.num_rounds = num_rounds
        self.started = self.last = time.monotonic()
        self.history: list[dict[str, Any]] = []

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self.run_dir.save_global(server_round, from_record(arrays))
        if server_round == 0:  # the initial state, before any training
            return None
        now = time.monotonic()
        stats = self.strategy.stats(server_round)
        local = stats.local_accuracy
        row = {
            "round": server_round,
            "train-loss": stats.train_metrics.get("train-loss"),
            "train-accuracy": stats.train_metrics.get("train-accuracy"),
            "local-accuracy": sum(local.values()) / len(local) if local else None,
            "local-accuracy-per-client": {str(k): v for k, v in sorted(local.items())},
            "sampled": stats.sampled_train,
            "valid-replies": stats.valid,
            "rejected-replies": len(stats.rejected),
            "rejections": {str(k): v for k, v in stats.rejected.items()},
            "bytes-received": stats.bytes_received,
            "seconds": round(now - self.last, 2),
        }
        self.last = now
        self.history.append(row)
        self.run_dir.append_round(row)
        print(_progress_line(row, self.num_rounds), flush=True)
        return None

    def finish(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        summary = {
            "rounds-completed": len(self.history),
            "final-local-accuracy": last.get("local-accuracy"),
            "final-train-loss": last.get("train-loss"),
            "total-bytes-received": sum(r["bytes-received"] for r in self.history),
            "total-rejected-replies": sum(r["rejected-replies"] for r in self.history),
            "wall-seconds": round(time.monotonic() - self.started, 2),
            "run-dir": str(self.run_dir.path),
        }
        self.run_dir.write_summary(summary)
        print(f"[pfedmma] done: {summary['rounds-completed']} rounds, final local accuracy "
              f"{_fmt(summary['final-local-accuracy'])}; results in {self.run_dir.path}", flush=True)
        return summary


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _progress_line(row: dict[str, Any], num_rounds: int) -> str:
    return (
        f"[pfedmma] round {row['round']}/{num_rounds} | train loss {_fmt(row['train-loss'])} "
        f"acc {_fmt(row['train-accuracy'])} | local acc {_fmt(row['local-accuracy'])} | "
        f"replies {row['valid-replies']}/{row['sampled']} ok, {row['rejected-replies']} rejected | "
        f"{row['bytes-received'] / 1024:.1f} KiB in | {row['seconds']:.1f}s"
    )
