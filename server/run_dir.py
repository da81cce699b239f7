"""The run directory: resolved config, per-round metrics, global shared state, summary.

Layout::

    <output-dir>/<timestamp>-run<id>/
        config.json            resolved run config
        metrics.jsonl          one JSON object per round
        global/round-000.safetensors ...   global shared state after every round
        partition.json         which classes and how many images each client holds
        evaluation.json/.md/.csv   Local/Base/Novel/HM per client at the reported round
        summary.json           final results
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from common.metrics import csv_rows, markdown_table, per_domain_means, summarize


class RunDirectory:
    def __init__(self, root: Path, run_id: int, config: Mapping[str, Any]) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.path = root.expanduser().resolve() / f"{stamp}-run{run_id}"
        (self.path / "global").mkdir(parents=True, exist_ok=False)
        self._write_json("config.json", dict(config))

    def _write_json(self, name: str, data: Any) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.path / name)

    def save_global(self, server_round: int, state: Mapping[str, torch.Tensor]) -> Path:
        path = self.path / "global" / f"round-{server_round:03d}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path

    def append_round(self, row: Mapping[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(row), sort_keys=True) + "\n")

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self._write_json("summary.json", dict(summary))

    def write_partition(self, partition: Mapping[str, Any]) -> None:
        self._write_json("partition.json", dict(partition))

    def write_evaluation(
        self, server_round: int, per_client: Mapping[int, Mapping[str, float]], domains: Mapping[int, str], selection: str
    ) -> dict[str, Any]:
        """evaluation.json, evaluation.md and evaluation.csv for the reported round."""
        summary = summarize(per_client)
        by_domain = per_domain_means(per_client, domains) if domains else {}
        table = markdown_table(per_client, summary, dict(domains) or None)
        result = {
            "round": server_round,
            "model-selection": selection,
            "per-client": {str(c): dict(v) for c, v in sorted(per_client.items())},
            "domains": {str(c): d for c, d in sorted(domains.items())},
            "summary": summary,
            "per-domain-local": by_domain,
            "hm3": "harmonic mean of mean Local, Base, Novel (the paper's averaged HM)",
            "hm2": "harmonic mean of mean Base and Novel",
        }
        self._write_json("evaluation.json", result)
        notes = "\nAccuracy in %. HM3 = HM(Local, Base, Novel) of the means (the paper's HM); HM2 = HM(Base, Novel).\n"
        domain_lines = "".join(f"\n- {d}: {100 * v:.2f}" for d, v in by_domain.items())
        domain_block = f"\nMean Local per domain:{domain_lines}\n" if by_domain else ""
        (self.path / "evaluation.md").write_text(
            f"# Evaluation at round {server_round} (model selection: {selection})\n\n{table}\n{notes}{domain_block}"
        )
        with open(self.path / "evaluation.csv", "w", newline="") as f:
            csv.writer(f).writerows(csv_rows(per_client, summary))
        return {**result, "table": table}
