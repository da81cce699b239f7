"""Run `flwr run .` against a private, throw-away local SuperLink (own FLWR_HOME and ports)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
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


FLWR = str(Path(sys.executable).parent / "flwr")


def _run_command(run_config: str, supernodes: int) -> list[str]:
    """As users run it: on a GPU machine every simulated client gets a GPU share (common.device)."""
    from common.device import simulation_resources

    federation = f"num-supernodes={supernodes} {simulation_resources(supernodes)}".strip()
    return [FLWR, "run", ".", "--stream", "--federation-config", federation, "--run-config", run_config]


def flwr_run(flwr_home: Path, run_config: str, supernodes: int, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _run_command(run_config, supernodes), cwd=REPO, env=flower_env(flwr_home),
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def flwr_run_until(flwr_home: Path, run_config: str, supernodes: int, marker: str, timeout: float) -> tuple[str, str]:
    """Start a run, wait until ``marker`` is printed, then stop the run with `flwr stop`.

    Returns (run id, output so far). The env (and so the SuperLink's ports) is kept per home.
    """
    env = _ENVS.setdefault(str(flwr_home), flower_env(flwr_home))
    proc = subprocess.Popen(
        _run_command(run_config, supernodes), cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    run_id = ""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "Successfully started run" in line:
            run_id = line.split()[-1].strip()
        if marker in line or time.monotonic() > deadline:
            break
    subprocess.run([FLWR, "stop", run_id], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    _wait_until_finished(run_id, env, timeout=180)
    _wait_until_serverapp_exits(flwr_home, timeout=180)
    return run_id, "".join(lines) + (rest or "")


def _serverapps_under(flwr_home: Path) -> list[int]:
    """Pids of `flwr-serverapp` processes started for this home (their environment names it)."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"flwr-serverapp" in (proc / "cmdline").read_bytes() and marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _wait_until_serverapp_exits(flwr_home: Path, timeout: float) -> None:
    """After `flwr stop` the SuperLink says "finished:stopped" at once, but the ServerApp process
    learns of it only at its next exchange with the SuperLink and can meanwhile finish more
    rounds (fast ones, here) and write to its run directory: wait (bounded) until it is gone."""
    deadline = time.monotonic() + timeout
    while _serverapps_under(flwr_home) and time.monotonic() < deadline:
        time.sleep(1)


def _wait_until_finished(run_id: str, env: dict[str, str], timeout: float) -> None:
    """The ServerApp may finish its current round after `flwr stop`; wait (bounded) for the final status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = subprocess.run(
            [FLWR, "ls", "--run-id", run_id, "--format", "json"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
        )
        if re.search(r'"status":\s*"finished', listing.stdout):  # e.g. "finished:stopped"
            return
        time.sleep(2)


def flwr_run_in(flwr_home: Path, run_config: str, supernodes: int, timeout: float) -> subprocess.CompletedProcess[str]:
    """Like :func:`flwr_run`, reusing the SuperLink that an earlier call for this home started."""
    env = _ENVS.setdefault(str(flwr_home), flower_env(flwr_home))
    return subprocess.run(
        _run_command(run_config, supernodes), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


_ENVS: dict[str, dict[str, str]] = {}


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
