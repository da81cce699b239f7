"""Read the comparison's run directories and reduce them to one table: per method, the mean
and standard deviation over seeds of every reported metric, with cost figures."""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Reported metrics, in table order, with their column titles. base-other = the base test
# images of other clients' classes (Local holds the client's own).
METRICS = {"local": "Local", "base": "Base", "base-other": "Base-other", "novel": "Novel", "hm3": "HM3", "hm2": "HM2"}


@dataclass
class SeedResult:
    """One finished run: its selected-round evaluation, its per-round curve and its costs."""

    seed: int
    run_dir: Path
    evaluation: dict[str, float]
    curve: list[dict[str, Any]]  # metrics.jsonl rows: round + evaluation means
    trainable: int
    floats_up: float  # per client per round
    floats_down: float
    wall_seconds: float  # the whole `flwr run`, start-up included
    clients: int

    @classmethod
    def read(cls, seed: int, run_dir: Path, wall_seconds: float) -> SeedResult:
        summary = json.loads((run_dir / "summary.json").read_text())
        method = json.loads((run_dir / "method.json").read_text())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        evaluation = json.loads((run_dir / "evaluation.json").read_text())
        return cls(
            seed=seed,
            run_dir=run_dir,
            evaluation={k: float(v) for k, v in summary["evaluation"].items()},
            curve=[{"round": r["round"], **r["evaluation"]} for r in rows if r.get("full-eval") and r["evaluation"]],
            trainable=int(method["parameters"]["trainable-per-client"]),
            floats_up=float(summary["communication"]["floats-up-per-client-round"]),
            floats_down=float(summary["communication"]["floats-down-per-client-round"]),
            wall_seconds=wall_seconds,
            clients=len(evaluation["per-client"]),
        )


@dataclass
class MethodResult:
    method: str
    seeds: list[SeedResult] = field(default_factory=list)

    def values(self, metric: str) -> list[float]:
        return [s.evaluation[metric] for s in self.seeds if metric in s.evaluation]

    def mean_std(self, metric: str) -> tuple[float, float] | None:
        values = self.values(metric)
        if not values:
            return None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    def cost(self, name: str) -> float:
        return statistics.fmean(getattr(s, name) for s in self.seeds)

    def to_json(self) -> dict[str, Any]:
        stats = {m: self.mean_std(m) for m in METRICS}
        return {
            "method": self.method,
            "seeds": [s.seed for s in self.seeds],
            "clients": sorted({s.clients for s in self.seeds}),
            "metrics": {m: {"mean": v[0], "std": v[1], "n": len(self.values(m))} for m, v in stats.items() if v},
            "per-seed": {
                str(s.seed): {"evaluation": s.evaluation, "run-dir": str(s.run_dir), "wall-seconds": s.wall_seconds}
                for s in self.seeds
            },
            "trainable-per-client": self.seeds[0].trainable,
            "floats-up-per-client-round": self.cost("floats_up"),
            "floats-down-per-client-round": self.cost("floats_down"),
            "wall-seconds-mean": self.cost("wall_seconds"),
        }


def _cell(stats: tuple[float, float] | None, seeds: int) -> str:
    if stats is None:
        return "–"
    mean, std = stats
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if seeds > 1 else f"{100 * mean:.2f}"


def markdown(results: list[MethodResult]) -> str:
    head = ["method", "seeds", *METRICS.values(), "trainable / client", "floats up / client / round", "floats down / client / round", "wall s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        n = len(r.seeds)
        cells = [r.method, str(n), *(_cell(r.mean_std(m), n) for m in METRICS)]
        cells += [f"{r.seeds[0].trainable:,}", f"{r.cost('floats_up'):,.0f}", f"{r.cost('floats_down'):,.0f}", f"{r.cost('wall_seconds'):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\nAccuracy in %, mean ± standard deviation over seeds (sample std), each seed's value being the "
        "unweighted mean over clients at the reported round. Base-other: base test images of other "
        "clients' classes. Floats: tensor values per client per round, counted by the server. "
        "Wall: the whole `flwr run`, start-up included.\n"
    )
    return "\n".join(lines) + "\n" + note


def write_tables(results: list[MethodResult], out: Path, header: dict[str, Any]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "table.md", "csv": out / "table.csv", "json": out / "results.json"}
    paths["md"].write_text(markdown(results))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        columns = [f"{m}-{s}" for m in METRICS for s in ("mean", "std")]
        writer.writerow(["method", "seeds", *columns, "trainable-per-client", "floats-up-per-client-round", "floats-down-per-client-round", "wall-seconds"])
        for r in results:
            cells: list[str] = []
            for m in METRICS:
                stats = r.mean_std(m)
                cells += ["", ""] if stats is None else [f"{stats[0]:.6f}", f"{stats[1]:.6f}"]
            writer.writerow([r.method, len(r.seeds), *cells, r.seeds[0].trainable, f"{r.cost('floats_up'):.1f}", f"{r.cost('floats_down'):.1f}", f"{r.cost('wall_seconds'):.1f}"])
    paths["json"].write_text(json.dumps({**header, "methods": [r.to_json() for r in results]}, indent=2) + "\n")
    return paths
