"""The run directory: resolved config, per-round metrics, global shared state, summary.

Layout::

    <output-dir>/<timestamp>-run<id>/
        config.json            resolved run config
        method.json            the method: settings, parameters per role, tensor names by role
        metrics.jsonl          one JSON object per round
        global/round-000.safetensors ...   global shared state after every round
        server/round-001.safetensors ...   what the strategy keeps besides it (pFedMoAP: each
                               client's latest prompt), for methods that keep anything
        partition.json         which classes and how many images each client holds
        evaluation.json/.md/.csv   Local/Base/Novel/HM per client at the reported round
        summary.json           final results
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from common.errors import disk_full, is_disk_full
from common.metrics import clients_in_mean, csv_rows, markdown_table, per_domain_means, summarize


class ResumeError(ValueError):
    """A run directory cannot be resumed (missing, incomplete, or another model)."""


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, root: Path, run_id: int, config: Mapping[str, Any], state_namespace: str) -> RunDirectory:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = cls(root.expanduser().resolve() / f"{stamp}-run{run_id}")
        with run_dir._writing(run_dir.path):
            (run_dir.path / "global").mkdir(parents=True, exist_ok=False)
        run_dir._write_json("config.json", dict(config))
        run_dir._write_json("run.json", {"run-id": run_id, "state-namespace": state_namespace, "resumed-by": []})
        return run_dir

    @classmethod
    def resume(cls, path: Path, run_id: int, config: Mapping[str, Any], must_match: Sequence[str]) -> RunDirectory:
        """Reopen ``path`` to continue it; the model-defining keys must equal the stored ones."""
        run_dir = cls(path.expanduser().resolve())
        for name in ("config.json", "run.json"):
            if not (run_dir.path / name).is_file():
                raise ResumeError(f"resume-from={str(path)!r}: no {name} there; expected a pFedMMA run directory")
        stored = json.loads((run_dir.path / "config.json").read_text())
        differing = {k: (stored.get(k), config.get(k)) for k in must_match if stored.get(k) != config.get(k)}
        if differing:
            raise ResumeError(f"resume-from={str(path)!r} was run with other settings (stored, now): {differing}")
        rows = run_dir.completed_rounds()
        # Drop a torn or unsaved last row so that appended rows continue a clean history.
        tmp = run_dir.path / ".metrics.jsonl.tmp"
        with run_dir._writing(run_dir.path / "metrics.jsonl", tmp):
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            tmp.replace(run_dir.path / "metrics.jsonl")
        info = run_dir.run_info()
        info["resumed-by"].append({"run-id": run_id, "after-round": run_dir.last_completed_round()})
        run_dir._write_json("run.json", info)
        return run_dir

    @contextlib.contextmanager
    def _writing(self, path: Path, temporary: Path | None = None) -> Iterator[None]:
        """A full disk while writing ``path`` becomes a :class:`DiskFullError` naming it and
        output-dir. ``temporary``, written to be renamed over ``path``, is removed, so ``path``
        keeps its previous content."""
        try:
            yield
        except Exception as err:
            if temporary is not None:
                temporary.unlink(missing_ok=True)
            if not is_disk_full(err):
                raise
            raise disk_full(
                path, "the run record", "free space there, or set output-dir to another file system; the "
                f"rounds saved so far continue with resume-from={str(self.path)!r}",
            ) from None

    def run_info(self) -> dict[str, Any]:
        return json.loads((self.path / "run.json").read_text())

    def completed_rounds(self) -> list[dict[str, Any]]:
        """Rows of metrics.jsonl whose global state was saved (a torn last line is ignored)."""
        path = self.path / "metrics.jsonl"
        rows = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if self.global_path(row["round"]).exists():
                rows.append(row)
        return rows

    def last_completed_round(self) -> int:
        rows = self.completed_rounds()
        return int(rows[-1]["round"]) if rows else 0

    def global_path(self, server_round: int) -> Path:
        return self.path / "global" / f"round-{server_round:03d}.safetensors"

    def load_global(self, server_round: int) -> dict[str, torch.Tensor]:
        path = self.global_path(server_round)
        if not path.is_file():
            raise ResumeError(f"{path} is missing; cannot resume after round {server_round}")
        return load_file(str(path))

    def _write_json(self, name: str, data: Any) -> None:
        tmp = self.path / f".{name}.tmp"
        with self._writing(self.path / name, tmp):
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            tmp.replace(self.path / name)

    def save_global(self, server_round: int, state: Mapping[str, torch.Tensor]) -> Path:
        path = self.global_path(server_round)
        tmp = path.with_name(f".{path.name}.tmp")
        with self._writing(path, tmp):
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
            tmp.replace(path)  # a checkpoint is either complete or absent
        return path

    def server_state_path(self, server_round: int) -> Path:
        return self.path / "server" / f"round-{server_round:03d}.safetensors"

    def save_server_state(self, server_round: int, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
        if not arrays and not metadata:
            return
        path = self.server_state_path(server_round)
        tmp = path.with_name(f".{path.name}.tmp")
        with self._writing(path, tmp):
            path.parent.mkdir(exist_ok=True)
            save_numpy({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=dict(metadata))
            tmp.replace(path)

    def load_server_state(self, server_round: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The strategy's state after ``server_round`` ({} and {} when it kept none)."""
        path = self.server_state_path(server_round)
        if not path.is_file():
            return {}, {}
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
        return load_numpy(str(path)), metadata

    def write_method(self, record: Mapping[str, Any]) -> None:
        self._write_json("method.json", dict(record))

    def append_round(self, row: Mapping[str, Any]) -> None:
        # A torn last line (the disk filled mid-write) is dropped by completed_rounds() on resume.
        with self._writing(self.path / "metrics.jsonl"), open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(row), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self._write_json("summary.json", dict(summary))

    def write_partition(self, partition: Mapping[str, Any]) -> None:
        self._write_json("partition.json", dict(partition))

    def write_evaluation(
        self, server_round: int, per_client: Mapping[int, Mapping[str, float]], domains: Mapping[int, str], selection: str,
        excluded: Mapping[int, str] | None = None,
    ) -> dict[str, Any]:
        """evaluation.json, evaluation.md and evaluation.csv for the reported round; the means
        leave out the ``excluded`` clients (client -> why), which the tables still list."""
        excluded = dict(excluded or {})
        counted = {c: v for c, v in per_client.items() if c not in excluded}
        summary = summarize(counted)
        by_domain = per_domain_means(counted, domains) if domains else {}
        table = markdown_table(per_client, summary, dict(domains) or None, excluded)
        result = {
            "round": server_round,
            "model-selection": selection,
            "per-client": {str(c): dict(v) for c, v in sorted(per_client.items())},
            "domains": {str(c): d for c, d in sorted(domains.items())},
            "excluded": {str(c): why for c, why in sorted(excluded.items())},
            "clients-in-mean": clients_in_mean(counted),
            "summary": summary,
            "per-domain-local": by_domain,
            "hm3": "harmonic mean of mean Local, Base, Novel (the paper's averaged HM)",
            "hm2": "harmonic mean of mean Base and Novel",
        }
        self._write_json("evaluation.json", result)
        notes = "\nAccuracy in %. HM3 = HM(Local, Base, Novel) of the means (the paper's HM); HM2 = HM(Base, Novel).\n"
        domain_lines = "".join(f"\n- {d}: {100 * v:.2f}" for d, v in by_domain.items())
        domain_block = f"\nMean Local per domain:{domain_lines}\n" if by_domain else ""
        with self._writing(self.path / "evaluation.md"):
            (self.path / "evaluation.md").write_text(
                f"# Evaluation at round {server_round} (model selection: {selection})\n\n{table}\n{notes}{domain_block}"
            )
        with self._writing(self.path / "evaluation.csv"), open(self.path / "evaluation.csv", "w", newline="") as f:
            csv.writer(f).writerows(csv_rows(per_client, summary, excluded))
        return {**result, "table": table}
