"""Run one planned (method, seed) with `flwr run`, in simulation or against a deployment."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.compare.plan import PlannedRun


@dataclass(frozen=True)
class Target:
    """Where runs go: the app, and either a simulated federation or a SuperLink connection.

    In a deployment the ServerApp writes its run directory on its own machine:
    ``server_output_dir`` is the results folder's ``runs/`` as the ServerApp sees it (a shared
    or mounted path); by default the same path, as on one machine.
    """

    app: Path
    supernodes: int = 4
    connection: str = ""  # a SuperLink connection in $FLWR_HOME/config.toml; "" = simulation
    server_output_dir: str = ""
    gpus_per_client: float = 0.0  # simulation: each client's GPU share (0 = none)

    def output_dir(self, run: PlannedRun, runs_root: Path) -> str:
        if not self.server_output_dir:
            return str(run.folder.resolve())
        return f"{self.server_output_dir.rstrip('/')}/{run.folder.relative_to(runs_root).as_posix()}"

    def command(self, run: PlannedRun, runs_root: Path, state_dir: Path | None) -> list[str]:
        """`flwr run` with the whole run config in ``run-config.toml`` beside the run (Flower
        takes a TOML file or key=value pairs, not both)."""
        values = {**run.run_config, "output-dir": self.output_dir(run, runs_root)}
        if state_dir is not None:  # simulation: private adapters of this comparison stay in it
            values["state-dir"] = str(state_dir.resolve())
        run.folder.mkdir(parents=True, exist_ok=True)
        config_file = run.folder / "run-config.toml"
        config_file.write_text("".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items()))
        command = [str(Path(sys.executable).parent / "flwr"), "run", str(self.app)]
        if self.connection:
            command.append(self.connection)
        command += ["--stream", "--run-config", str(config_file.resolve())]
        if not self.connection:
            federation = f"num-supernodes={self.supernodes}"
            if self.gpus_per_client > 0:
                federation += f" client-resources-num-gpus={self.gpus_per_client:g}"
            command += ["--federation-config", federation]
        return command


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string


@dataclass(frozen=True)
class Outcome:
    run_dir: Path | None
    seconds: float
    returncode: int
    message: str


def execute(run: PlannedRun, command: list[str], show: Callable[[str], None]) -> Outcome:
    """Run ``command``, log all its output to ``flwr.log`` and pass its progress lines to ``show``."""
    run.folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # `flwr run` starts `flower-superlink` by name: find the one installed beside this Python.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1"}
    # The app runs from this checkout, whose dependencies are installed: without this, Flower
    # (1.41) builds a fresh environment with `uv sync` for every run (about 25 s each here).
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    with open(run.folder / "flwr.log", "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if any(f"[pfedmma] {word}" in line for word in ("round", "done", "FAILED", "  ")):
                show(line[line.index("[pfedmma]") + len("[pfedmma] ") :].rstrip())
        returncode = proc.wait()
    # Rounded here, not only in compare.json, so that a table built now and one rebuilt
    # from the records later average the same numbers.
    seconds = round(time.monotonic() - started, 1)
    finished = [d for d in run.run_dirs() if (d / "summary.json").is_file()]
    failure = _failure(finished[0]) if len(finished) == 1 else None
    if returncode == 0 and len(finished) == 1 and failure is None:
        return Outcome(finished[0], seconds, returncode, "completed")
    logged = (run.folder / "flwr.log").read_text(errors="replace").splitlines()
    failed_lines = [line.split("[pfedmma] ", 1)[1].strip() for line in logged if "[pfedmma] FAILED" in line or "[pfedmma]   " in line]
    if failure is not None:
        reason = f"the run failed: {failure}"
    elif failed_lines:
        reason = " ".join(failed_lines)
    else:
        reason = f"flwr run exited with {returncode}" if returncode else "no run directory with a summary.json was written"
    return Outcome(None, seconds, returncode, f"{reason}; see {run.folder / 'flwr.log'}")


def _failure(run_dir: Path) -> str | None:
    """What summary.json says went wrong, or None for a run that completed."""
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("status", "completed") == "completed":
        return None
    failure = summary.get("failure") or {}
    clients = "; ".join(f"{who}: {why}" for who, why in (failure.get("clients") or {}).items())
    return f"{failure.get('reason', 'unknown reason')} ({clients})" if clients else str(failure.get("reason", "unknown reason"))


def write_record(run: PlannedRun, command: list[str], outcome: Outcome) -> None:
    record = {
        "status": "completed" if outcome.run_dir is not None else "failed",
        "method": run.method,
        "seed": run.seed,
        "run-config": run.run_config,
        "command": shlex.join(command),
        "wall-seconds": outcome.seconds,
        "run-dir": str(outcome.run_dir) if outcome.run_dir is not None else None,
        "message": outcome.message,
    }
    run.record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
