"""Which runs a comparison needs, where each lives, and whether it is already done.

Results folder layout::

    <out>/runs/<method>/seed-<n>/
        <timestamp>-run<id>/   the run directory the ServerApp wrote (server/run_dir.py)
        run-config.toml        the run config passed to `flwr run`
        flwr.log               everything `flwr run --stream` printed
        compare.json           the requested run config, the command, wall time, outcome
"""

from __future__ import annotations

import json
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class PlanError(ValueError):
    """The comparison cannot start as asked (bad preset, method, seed or results folder)."""


def read_preset(path: Path) -> dict[str, Any]:
    """A preset is a flat TOML of run-config keys, as `flwr run --run-config FILE` takes it."""
    if not path.is_file():
        raise PlanError(f"--preset {str(path)!r}: no such file; presets are in conf/ (e.g. conf/miniature.toml)")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise PlanError(f"--preset {str(path)!r} is not valid TOML: {err}") from None
    nested = sorted(k for k, v in values.items() if isinstance(v, dict))
    if nested:
        raise PlanError(f"--preset {str(path)!r}: tables {nested} are not run-config keys; a preset is flat key = value")
    return values


@dataclass(frozen=True)
class PlannedRun:
    method: str
    seed: int
    folder: Path  # <out>/runs/<method>/seed-<n>
    run_config: dict[str, Any]  # preset + overrides + method + seed: what this run must have used

    @property
    def label(self) -> str:
        return f"{self.method} seed {self.seed}"

    @property
    def record_path(self) -> Path:
        return self.folder / "compare.json"

    def run_dirs(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and (p / "config.json").is_file())

    def record(self) -> dict[str, Any] | None:
        return json.loads(self.record_path.read_text()) if self.record_path.is_file() else None

    def completed_dir(self) -> Path | None:
        """The run directory of a finished run of exactly this config, if there is one."""
        record = self.record()
        if record is None or record.get("status") != "completed":
            return None
        if record.get("run-config") != self.run_config:
            raise PlanError(
                f"{self.folder} holds a run of another config (e.g. another preset); "
                "use a new --out folder, or --force to replace it"
            )
        path = Path(record["run-dir"])
        return path if (path / "summary.json").is_file() else None

    def clear(self) -> None:
        """Forget an unfinished (or, with --force, finished) attempt: only our own outputs."""
        if self.folder.is_dir():
            shutil.rmtree(self.folder)


def plan_runs(out: Path, preset: dict[str, Any], methods: list[str], seeds: list[int], overrides: dict[str, Any]) -> list[PlannedRun]:
    from common.config import ConfigError, RunConfig

    runs = []
    for method in methods:
        for seed in seeds:
            on_top = {**overrides, "method": method, "seed": seed}
            config = {**preset, **on_top}
            try:
                RunConfig.from_flower(config)  # fail before the first run, not in the seventh
            except ConfigError as err:
                raise PlanError(f"{method} seed {seed}: {err}") from None
            runs.append(PlannedRun(method, seed, out / "runs" / method / f"seed-{seed}", config))
    return runs
