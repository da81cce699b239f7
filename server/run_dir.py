"""The run directory: resolved config, per-round metrics, global shared state, summary.

Layout::

    <output-dir>/<timestamp>-run<id>/
        config.json            resolved run config
        metrics.jsonl          one JSON object per round
        global/round-000.safetensors ...   global shared state after every round
        summary.json           final results
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


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
