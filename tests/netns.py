"""Several hosts on one machine: Linux network namespaces joined by a bridge, and the
processes a test starts inside them.

Each :class:`Host` is a namespace with its own loopback and one address on a private
/24; the bridge lives in a namespace of its own, so nothing is added to (or routed from)
the machine's root namespace. Processes are started in their own session so that a test
can stop one "host service" together with every child it spawned (a SuperNode, its
SuperExec and the ClientApp processes) by that one process-group id.

Everything is torn down by :meth:`Network.close`: processes first (namespaces with live
processes in them would linger), then the namespaces. Names carry the test process's pid,
so that :func:`remove_stale` can clear what a killed test run left behind without touching
anyone else's namespaces.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "pfm"  # every namespace this module creates starts with it


def available() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(("-n", netns) if netns else ()), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pids_in(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _delete_namespace(netns: str) -> None:
    # Anything still running in a namespace we made was started by us (or by what we started).
    for pid in _pids_in(netns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


def remove_stale() -> None:
    """Delete namespaces left by earlier test processes of this module that no longer exist."""
    for name in _namespaces():
        owner = name.removeprefix(PREFIX).split("-", 1)[0]
        mine = name.startswith(PREFIX) and owner.isdigit()
        if mine and int(owner) != os.getpid() and not Path(f"/proc/{owner}").exists():
            _delete_namespace(name)


class Process:
    """A command running in a host namespace, its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], netns: str, log: Path, env: Mapping[str, str], cwd: Path | None):
        self.name = name
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 (open as long as the process runs)
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv],  # `ip netns exec` execs the command: same pid
            stdout=self._out, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, text: str, timeout: float) -> bool:
        """Whether ``text`` appeared in the log within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            time.sleep(0.5)
        return text in self.output()

    def kill(self) -> None:
        """Crash it: SIGKILL to its whole process group, no chance to say goodbye."""
        self._signal_group(signal.SIGKILL)
        self.popen.wait(timeout=30)
        self._out.close()

    def terminate(self) -> None:
        """Ask it to stop: SIGTERM to its process group."""
        if self.alive():
            self._signal_group(signal.SIGTERM)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the process group, then SIGKILL whatever is left after ``grace`` seconds."""
        self.terminate()
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)  # children that outlived their parent
        if self.alive():
            self.popen.wait(timeout=30)
        self._out.close()

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.pid, sig)  # the group this process leads (start_new_session)
        except ProcessLookupError:
            pass


@dataclass
class Host:
    """One network namespace with one address on the test network."""

    name: str
    netns: str
    address: str
    network: Network
    processes: list[Process] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path | None = None) -> Process:
        proc = Process(f"{self.name}/{name}", argv, self.netns, log, env, cwd)
        self.processes.append(proc)
        return proc

    def run(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], env=dict(env), cwd=cwd,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def set_link(self, up: bool) -> None:
        """Plug or unplug this host's cable (its interface on the bridge)."""
        _ip("link", "set", f"v-{self.name}", "up" if up else "down", netns=self.network.switch)

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            proc.stop(grace=5)


class Network:
    """A bridge ("switch") namespace and hosts on ``subnet``.0/24 plugged into it."""

    def __init__(self, tag: str, subnet: str = "10.77.0") -> None:
        remove_stale()
        self.prefix = f"{PREFIX}{os.getpid()}-{tag}"
        self.subnet = subnet
        self.hosts: dict[str, Host] = {}
        self.switch = f"{self.prefix}-sw"
        self._made: list[str] = []
        try:
            self._add_namespace(self.switch)
            _ip("link", "add", "br0", "type", "bridge", netns=self.switch)
            _ip("link", "set", "br0", "up", netns=self.switch)
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, netns: str) -> None:
        _ip("netns", "add", netns)
        self._made.append(netns)
        _ip("link", "set", "lo", "up", netns=netns)

    def add_host(self, name: str, octet: int) -> Host:
        """A namespace ``<prefix>-<name>`` with address ``<subnet>.<octet>`` on eth0."""
        if len(f"v-{name}") > 15:
            raise ValueError(f"host name {name!r} is too long for an interface name (at most 13 characters)")
        netns = f"{self.prefix}-{name}"
        self._add_namespace(netns)
        _ip("link", "add", "eth0", "type", "veth", "peer", "name", f"v-{name}", "netns", self.switch, netns=netns)
        _ip("link", "set", f"v-{name}", "master", "br0", netns=self.switch)
        _ip("link", "set", f"v-{name}", "up", netns=self.switch)
        address = f"{self.subnet}.{octet}"
        _ip("addr", "add", f"{address}/24", "dev", "eth0", netns=netns)
        _ip("link", "set", "eth0", "up", netns=netns)
        host = Host(name, netns, address, self)
        self.hosts[name] = host
        return host

    def close(self, grace: float = 5.0) -> None:
        """Stop every process (SIGTERM to all at once, SIGKILL after ``grace``), then delete the namespaces."""
        procs = [proc for host in self.hosts.values() for proc in host.processes]
        for proc in procs:
            proc.terminate()
        deadline = time.monotonic() + grace
        for proc in procs:
            proc.stop(grace=max(0.0, deadline - time.monotonic()))
        for netns in reversed(self._made):
            _delete_namespace(netns)
        self._made.clear()
