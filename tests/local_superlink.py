"""Run `flwr run .` against a private, throw-away local SuperLink (own FLWR_HOME and ports)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }


def flwr_run(flwr_home: Path, run_config: str, supernodes: int, timeout: float) -> subprocess.CompletedProcess[str]:
    command = [
        str(Path(sys.executable).parent / "flwr"), "run", ".", "--stream",
        "--federation-config", f"num-supernodes={supernodes}",
        "--run-config", run_config,
    ]
    return subprocess.run(
        command, cwd=REPO, env=flower_env(flwr_home), capture_output=True, text=True, timeout=timeout
    )


def stop_processes_under(flwr_home: Path) -> None:
    """Stop the detached SuperLink (and its SuperExec) that `flwr run` started for this home."""
    marker = str(flwr_home).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline and b"flower-superlink" in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except ProcessLookupError:
                pass
