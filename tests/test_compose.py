"""Compose end to end: the real compose.yaml brings up a federation that `flwr run` drives.

The fast test checks every compose file's commands against the installed Flower's CLI. The
end-to-end tests are slow and opt-in: ``PFEDMMA_DOCKER_TESTS=1 pytest -m slow tests/test_compose.py``. Needs root
(it may install docker.io and start dockerd) and about 25 GB of disk. The recipe follows
shared/ENVIRONMENT.md: ``tests/compose_support/setup_docker.sh`` provides the engine, Compose
v2 and a debootstrap base image; ``docker/build-wheelhouse.sh`` fills the wheelhouse (the
containers cannot reach a package index); an override file written here adapts the real
compose files to this environment (local base image, wheelhouse build, host networking with
127.0.0.1 for every service name, CPU only). The compose files themselves are used as users
run them.

Measured on the 2-core CI machine: see docs/deployment.md.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML comes with flwr; its stubs are not a dependency

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "tests" / "compose_support" / "setup_docker.sh"
WHEELHOUSE = REPO / "docker" / "wheelhouse"
BASE_IMAGE = os.environ.get("PFEDMMA_TEST_BASE_IMAGE", "pfedmma-base:bookworm")
IMAGE = os.environ.get("PFEDMMA_TEST_IMAGE", "pfedmma:compose-test")
FLWR = str(Path(sys.executable).parent / "flwr")
# Small enough for 2 CPU cores: the tiny CLIP on the procedural dataset, 2 rounds.
RUN_CONFIG = "num-server-rounds=2 shots=2 test-per-class=2 batch-size=16 output-dir='/results'"
# The tiny CLIP's checkpoint, put in the mounted weights folder and loaded from there by path, as
# real weights are (the presets' "~/.cache/pfedmma/weights/..." or "/weights/...").
CHECKPOINT = REPO / "common" / "weights" / "pfedmma-tiny-shapes.safetensors"

needs_docker = pytest.mark.skipif(
    os.environ.get("PFEDMMA_DOCKER_TESTS") != "1",
    reason="Docker end-to-end test: set PFEDMMA_DOCKER_TESTS=1 (needs root, ~25 GB disk, 15-30 min)",
)

TIMINGS: dict[str, float] = {}
# The ServerApp's last line (server/progress.py), e.g. "[pfedmma] done (pfedmma): 2 rounds; results
# in ...". The method in parentheses is optional here so that a change of that detail does not
# turn a completed federation into a failed test.
DONE_2_ROUNDS = re.compile(r"\[pfedmma\] done(?: \([^)]*\))?: 2 rounds\b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(cmd), check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"command failed ({result.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
        )
    return result


def _timed(name: str, cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> str:
    start = time.monotonic()
    result = _run(cmd, timeout, env)
    TIMINGS[name] = round(time.monotonic() - start, 1)
    print(f"[compose-test] {name}: {TIMINGS[name]} s", flush=True)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def docker_ready() -> None:
    """Engine, Compose v2, base image and wheelhouse: each made only when missing."""
    if os.geteuid() != 0 and shutil.which("docker") is None:
        pytest.skip("needs root to install and start Docker, or a running Docker engine")
    _timed("setup_docker", ["bash", str(SETUP), BASE_IMAGE], timeout=1200, env={**os.environ, "PYTHON": sys.executable})
    if not any(WHEELHOUSE.glob("*.whl")):
        _timed("build_wheelhouse", ["bash", str(REPO / "docker" / "build-wheelhouse.sh")], timeout=2400,
               env={**os.environ, "PYTHON": sys.executable})


def _host_override(path: Path, services: Sequence[str], names: Sequence[str], build_service: str | None) -> Path:
    """This environment only: host networking, every service name resolving to 127.0.0.1."""
    hosts = "    extra_hosts:\n" + "".join(f"      - {name}:127.0.0.1\n" for name in names) if names else ""
    text = "# Written by tests/test_compose.py: host networking for a machine without bridges.\nservices:\n"
    for service in services:
        text += f"  {service}:\n    network_mode: host\n    ports: !reset []\n{hosts}"
        if service == build_service:
            text += "    build:\n      network: host\n"
    path.write_text(text)
    return path


@dataclass
class Compose:
    project: str
    files: list[Path]
    env: dict[str, str]
    logs: Path
    started: list[str] = field(default_factory=list)

    def cmd(self, *args: str) -> list[str]:
        files = [a for f in self.files for a in ("-f", str(f))]
        return ["docker", "compose", "-p", self.project, *files, *args]

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(self.cmd(*args), timeout, self.env, check)

    def down(self) -> None:
        result = self("logs", "--no-color", "--timestamps", timeout=120, check=False)
        self.logs.write_text(result.stdout + result.stderr)
        self("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300, check=False)


def _run_config(clients: int, pretrained: str) -> str:
    """Every client in every round. The ServerApp waits (node-wait-timeout) until all of them have
    joined: a SuperNode is healthy when its own API answers, which on a loaded machine can be
    before the SuperLink knows it, and round 1 would otherwise start with the first two."""
    wait_for_all = f"min-available-nodes={clients} min-train-nodes={clients} min-evaluate-nodes={clients}"
    return f"{RUN_CONFIG} {wait_for_all} pretrained='{pretrained}'"


def _base_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "weights").mkdir(exist_ok=True)
    shutil.copy(CHECKPOINT, tmp_path / "weights" / CHECKPOINT.name)
    return {
        **os.environ,
        "PFEDMMA_IMAGE": IMAGE,
        "PFEDMMA_BASE_IMAGE": BASE_IMAGE,
        "PFEDMMA_WHEELHOUSE": "1",
        "PFEDMMA_LISTEN_HOST": "127.0.0.1",
        "PFEDMMA_DATA_DIR": str(tmp_path / "data"),
        "PFEDMMA_WEIGHTS_DIR": str(tmp_path / "weights"),
        "PFEDMMA_CPU_THREADS": "1",
    }


def _flwr_home(tmp_path: Path, name: str, address: str, tls_ca: Path | None = None) -> dict[str, str]:
    home = tmp_path / "flwr-home"
    home.mkdir(exist_ok=True)
    security = f'root-certificates = "{tls_ca}"' if tls_ca else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n'
    )
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def _volume_text(volume: str, command: str) -> str:
    """Read from a named volume through a throw-away container: proves the data is ON the volume."""
    return _run(["docker", "run", "--rm", "--network", "none", "-v", f"{volume}:/v:ro", "--entrypoint", "sh",
                 IMAGE, "-c", command], timeout=120).stdout


def _check_results(project: str, clients: Sequence[int], state_volume: str = "{project}_state-{i}") -> None:
    metrics = _volume_text(f"{project}_results", "cat /v/*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.splitlines() if line.strip()]
    assert [r["round"] for r in rows] == [1, 2], metrics
    for row in rows:
        assert row["valid-replies"] == len(clients) and row["rejected-replies"] == 0, row
    summary = json.loads(_volume_text(f"{project}_results", "cat /v/*/summary.json"))
    assert summary["rounds-completed"] == 2, summary
    checkpoints = _volume_text(f"{project}_results", "ls /v/*/global").split()
    assert checkpoints == ["round-000.safetensors", "round-001.safetensors", "round-002.safetensors"]
    for i in clients:
        files = _volume_text(state_volume.format(project=project, i=i), "find /v -name '*.safetensors'").split()
        assert [Path(f).name for f in files] == [f"client-{i}.safetensors"], files


@pytest.fixture(scope="module")
def image(docker_ready: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The one image, built the way users build it: `docker compose build` of compose.yaml."""
    tmp = tmp_path_factory.mktemp("image")
    override = _host_override(tmp / "compose.build.yaml", ["superlink"], [], build_service="superlink")
    env = _base_env(tmp)
    files = ["-f", str(REPO / "compose.yaml"), "-f", str(override)]
    _timed("image_build", ["docker", "compose", "-p", "pfedmma-e2e", *files, "build", "superlink"], timeout=2400, env=env)
    return IMAGE


@pytest.fixture
def single_machine(tmp_path: Path, image: str) -> Iterator[tuple[Compose, int]]:
    """compose.yaml + compose.cpu.yaml, as a user without GPUs runs it, on host networking."""
    ports = [_free_port() for _ in range(4)]
    env = {
        **_base_env(tmp_path),
        "SUPERLINK_PORT": str(ports[0]),
        **{f"SUPERNODE_{i}_PORT": str(ports[i + 1]) for i in range(3)},
    }
    services = ["superlink", "serverapp", *(f"{r}-{i}" for i in range(3) for r in ("supernode", "clientapp"))]
    names = ["superlink", "supernode-0", "supernode-1", "supernode-2"]
    override = _host_override(tmp_path / "compose.test.yaml", services, names, build_service=None)
    compose = Compose("pfedmma-e2e", [REPO / "compose.yaml", REPO / "compose.cpu.yaml", override], env,
                      tmp_path / "compose.log")
    compose("down", "-v", "--remove-orphans", timeout=300, check=False)  # leftovers of an aborted run
    try:
        _timed("compose_up", compose.cmd("up", "-d", "--no-build", "--wait", "--wait-timeout", "300"),
               timeout=400, env=env)
        yield compose, ports[0]
    finally:
        compose.down()
        print(f"[compose-test] logs: {compose.logs}; timings: {TIMINGS}", flush=True)


@pytest.mark.slow
@needs_docker
def test_compose_up_and_flwr_run_complete_a_federation(single_machine: tuple[Compose, int], tmp_path: Path) -> None:
    compose, port = single_machine
    ps = compose("ps", "--format", "json").stdout
    states = {json.loads(line)["Service"]: json.loads(line)["State"] for line in ps.splitlines() if line.strip()}
    assert len(states) == 8 and set(states.values()) == {"running"}, states

    # The weights folder is also where the presets look (HOME=/app), and ~/.cache/pfedmma stays the
    # app user's: Docker would make the mount point's missing parents root's.
    preset_path = f"~/.cache/pfedmma/weights/{CHECKPOINT.name}"
    for service in ("serverapp", "clientapp-0"):
        compose("exec", "-T", service, "sh", "-c",
                f"test -r {preset_path} && test -r /weights/{CHECKPOINT.name} && test -w ~/.cache/pfedmma", timeout=120)

    env = _flwr_home(tmp_path, "local-deployment", f"127.0.0.1:{port}")
    output = _timed("flwr_run_2_rounds", [FLWR, "run", ".", "local-deployment", "--stream",
                                          "--run-config", _run_config(3, preset_path)], timeout=1800, env=env)
    (tmp_path / "flwr-run.log").write_text(output)  # the ServerApp's lines, next to compose.log
    assert DONE_2_ROUNDS.search(output), output[-4000:]
    _check_results(compose.project, clients=[0, 1, 2])
    # Nothing was installed at run time: the dependencies are baked into the image.
    logs = compose("logs", "--no-color", "serverapp", "clientapp-0").stdout
    assert "uv sync" not in logs and "Installing" not in logs, logs[-3000:]


@pytest.mark.slow
@needs_docker
def test_tls_server_and_clients_on_separate_machines(tmp_path: Path, image: str) -> None:
    """Server side (compose.yaml + compose.tls.yaml: superlink, serverapp) and two clients as
    separate compose projects from compose.client.yaml, as on separate machines; TLS and
    SuperNode authentication; an unregistered key is refused."""
    certs = tmp_path / "certs"
    _timed("make_certs", ["bash", str(REPO / "scripts" / "make_certs.sh"), "--out", str(certs), "--nodes", "3"],
           timeout=120)
    port = _free_port()
    env = {**_base_env(tmp_path), "SUPERLINK_PORT": str(port), "PFEDMMA_CERTS_DIR": str(certs),
           "PFEDMMA_NUM_PARTITIONS": "2"}
    server_override = _host_override(tmp_path / "server.test.yaml", ["superlink", "serverapp"], ["superlink"], None)
    server = Compose("pfedmma-e2e-server", [REPO / "compose.yaml", REPO / "compose.tls.yaml", server_override],
                     env, tmp_path / "server.log")
    clients: list[Compose] = []
    try:
        server("down", "-v", "--remove-orphans", timeout=300, check=False)
        _timed("tls_server_up", server.cmd("up", "-d", "--no-build", "--wait", "--wait-timeout", "300",
                                           "superlink", "serverapp"), timeout=400, env=env)
        cli = _flwr_home(tmp_path, "server-tls", f"127.0.0.1:{port}", tls_ca=certs / "ca.crt")
        for i in (0, 1):
            _run([FLWR, "supernode", "register", str(certs / f"supernode-{i}.pub"), "server-tls"], 120, cli)

        for i in (0, 1):
            client_env = {**env, "SUPERLINK_ADDRESS": f"127.0.0.1:{port}", "PARTITION_ID": str(i),
                          "NUM_PARTITIONS": "2", "SUPERNODE_PORT": str(_free_port())}
            override = _host_override(tmp_path / f"client-{i}.test.yaml", ["supernode", "clientapp"],
                                      ["supernode"], None)
            client = Compose(f"pfedmma-e2e-client-{i}", [REPO / "compose.client.yaml",
                                                         REPO / "compose.client.cpu.yaml", override],
                             client_env, tmp_path / f"client-{i}.log")
            client("down", "-v", "--remove-orphans", timeout=300, check=False)
            clients.append(client)
            _timed(f"tls_client_{i}_up", client.cmd("up", "-d", "--no-build", "--wait", "--wait-timeout", "300"),
                   timeout=400, env=client_env)

        # A SuperNode with a key the SuperLink does not know is turned away.
        refused = _run(["docker", "run", "--rm", "--network", "host", "-v", f"{certs}:/certs:ro", IMAGE,
                        "flower-supernode", f"--superlink=127.0.0.1:{port}", "--root-certificates=/certs/ca.crt",
                        "--auth-supernode-private-key=/certs/supernode-2", "--isolation=process",
                        "--host=127.0.0.1", f"--port={_free_port()}", "--max-retries=1",
                        "--node-config=partition-id=0 num-partitions=2"], timeout=300, check=False)
        assert refused.returncode != 0, refused.stdout[-2000:]
        assert "Failed to activate SuperNode" in refused.stdout + refused.stderr, (refused.stdout + refused.stderr)[-2000:]

        output = _timed("tls_flwr_run_2_rounds", [FLWR, "run", ".", "server-tls", "--stream", "--run-config",
                                                  _run_config(2, f"/weights/{CHECKPOINT.name}")], timeout=1800, env=cli)
        (tmp_path / "flwr-run.log").write_text(output)
        assert DONE_2_ROUNDS.search(output), output[-4000:]
        _check_results(server.project, clients=[0, 1], state_volume="pfedmma-e2e-client-{i}_state")
    finally:
        for client in clients:
            client.down()
        server.down()
        print(f"[compose-test] timings: {TIMINGS}", flush=True)


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's `!reset` / `!override` tags (kept as plain values)."""


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(
        _tag, lambda loader, node: loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else loader.construct_scalar(node)
    )


@functools.cache
def _flower_help(program: str) -> str:
    return _run([str(Path(sys.executable).parent / program), "--help"], timeout=120).stdout


@pytest.mark.parametrize("name", ["compose.yaml", "compose.tls.yaml", "compose.client.yaml"])
def test_compose_commands_use_flags_that_flower_knows(name: str) -> None:
    """Flower's CLI changes between releases (1.41 dropped --plugin-type and the per-API
    address flags): every flag in a compose command must be in that command's --help."""
    services = yaml.load((REPO / name).read_text(), Loader=_ComposeLoader)["services"]
    commands = {svc: spec["command"] for svc, spec in services.items() if "command" in spec}
    assert commands, name
    for service, (program, *args) in commands.items():
        assert program in {"flower-superlink", "flower-supernode", "flower-superexec"}, (service, program)
        for arg in args:
            flag = arg.split("=", 1)[0]
            assert flag.startswith("--") and re.search(rf"{re.escape(flag)}(?![\w-])", _flower_help(program)), (
                f"{name}: service {service} uses {flag!r}, which `{program} --help` does not list"
            )
        if program == "flower-superlink":
            assert "--insecure" in args or any(a.startswith("--ssl-certfile=") for a in args), service


# -- GPU reservations and mounts, resolved as Compose resolves them ---------------------------------

CLIENTAPPS = ("clientapp-0", "clientapp-1", "clientapp-2")
# Compose needs these three for compose.client.yaml (`${VAR:?...}`); their values do not matter here.
CLIENT_REQUIRED = {"SUPERLINK_ADDRESS": "server.example.org:9093", "PARTITION_ID": "3", "NUM_PARTITIONS": "10"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _substitute(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation of one string: `$$`, `$VAR`, `${VAR}` and `${VAR:-d}`,
    `${VAR-d}`, `${VAR:?e}`, `${VAR?e}`, `${VAR:+a}`, `${VAR+a}`, defaults nested as Compose allows."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            name = _NAME.match(text, i + 2)
            assert name, f"bad interpolation at {text[i:]!r}"
            j, depth = name.end(), 1
            operator = next((op for op in (":-", ":?", ":+", "-", "?", "+") if text.startswith(op, j)), "")
            start = j + len(operator)
            k = start
            while depth:  # the matching brace, past nested ${...} in the default
                assert k < len(text), f"unclosed ${{ in {text!r}"
                depth += text.startswith("${", k) - (text[k] == "}")
                k += 2 if text.startswith("${", k) else 1
            word = _substitute(text[start:k - 1], env)
            value = env.get(name.group())
            unset_or_empty = value is None or (operator.startswith(":") and value == "")
            if operator in (":-", "-"):
                out.append(word if unset_or_empty else value or "")
            elif operator in (":?", "?"):
                assert not unset_or_empty, f"${{{name.group()}}} is required: {word}"
                out.append(value or "")
            elif operator in (":+", "+"):
                out.append("" if unset_or_empty else word)
            else:
                assert not operator and text[j] == "}", f"unsupported interpolation {text[i:k]!r}"
                out.append(value or "")
            i = k
        else:
            name = _NAME.match(text, i + 1)
            assert name, f"a lone $ in {text!r} (Compose wants $$)"
            out.append(env.get(name.group(), ""))
            i = name.end()
    return "".join(out)


def _interpolate(value: object, env: dict[str, str]) -> object:
    if isinstance(value, str):
        return _substitute(value, env)
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    return value


def _services(name: str, env: dict[str, str] | None = None) -> dict[str, dict]:
    """One compose file's services, merge keys applied, variables resolved from `env` only."""
    raw = yaml.load((REPO / name).read_text(), Loader=_ComposeLoader)["services"]
    return _interpolate(raw, env or {})  # type: ignore[return-value]


def _gpu_ids(service: dict) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    gpus = [d for d in devices if "gpu" in d.get("capabilities", [])]
    assert len(gpus) == 1 and gpus[0]["driver"] == "nvidia", devices
    assert "device_ids" in gpus[0], f"a GPU reserved without device ids (every such container gets GPU 0): {gpus[0]}"
    return [str(i) for i in gpus[0]["device_ids"]]


def test_clientapps_get_distinct_gpus_settable_per_client() -> None:
    """`count: 1` would give every clientapp device 0; device ids give each its own GPU."""
    defaults = _services("compose.yaml")
    assert [_gpu_ids(defaults[s]) for s in CLIENTAPPS] == [["0"], ["1"], ["2"]]
    chosen = _services("compose.yaml", {"PFEDMMA_GPU_0": "3", "PFEDMMA_GPU_1": "GPU-5a1e", "PFEDMMA_GPU_2": "3"})
    assert [_gpu_ids(chosen[s]) for s in CLIENTAPPS] == [["3"], ["GPU-5a1e"], ["3"]]  # two may share one
    # Only the clients train: nothing else reserves a GPU.
    assert {s for s, spec in defaults.items() if "deploy" in spec} == set(CLIENTAPPS)


def test_the_remote_client_gpu_is_settable() -> None:
    assert _gpu_ids(_services("compose.client.yaml", CLIENT_REQUIRED)["clientapp"]) == ["0"]
    chosen = _services("compose.client.yaml", {**CLIENT_REQUIRED, "PFEDMMA_GPU": "7"})
    assert _gpu_ids(chosen["clientapp"]) == ["7"]


@pytest.mark.parametrize("name", ["compose.yaml", "compose.client.yaml", "compose.tls.yaml",
                                  "compose.cpu.yaml", "compose.client.cpu.yaml"])
def test_no_service_reserves_gpus_by_count(name: str) -> None:
    for service, spec in _services(name, CLIENT_REQUIRED).items():
        devices = (spec.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices", [])
        assert all("count" not in d for d in devices), f"{name}: {service} reserves GPUs by count: {devices}"


@pytest.mark.parametrize(("base", "cpu"), [("compose.yaml", "compose.cpu.yaml"),
                                           ("compose.client.yaml", "compose.client.cpu.yaml")])
def test_the_cpu_overrides_reset_every_gpu_reservation(base: str, cpu: str) -> None:
    reserved = {s for s, spec in _services(base, CLIENT_REQUIRED).items() if "deploy" in spec}
    # Kept as plain values by _ComposeLoader: `!reset {}` reads as an empty mapping.
    reset = {s for s, spec in _services(cpu).items() if spec.get("deploy") == {}}
    assert reserved and reserved == reset, (base, reserved, cpu, reset)
    assert "deploy: !reset" in (REPO / cpu).read_text()


@pytest.mark.parametrize("name", ["compose.yaml", "compose.client.yaml"])
def test_weights_are_also_where_the_presets_look(name: str) -> None:
    """`pretrained = "~/.cache/pfedmma/weights/..."` must resolve in the containers (HOME=/app)."""
    env = {**CLIENT_REQUIRED, "PFEDMMA_WEIGHTS_DIR": "/srv/models"}
    with_weights = 0
    for service, spec in _services(name, env).items():
        mounts = {v.split(":")[1]: v for v in spec.get("volumes", [])}
        if "/weights" in mounts:
            with_weights += 1
            assert mounts.get("/app/.cache/pfedmma/weights") == "/srv/models:/app/.cache/pfedmma/weights:ro", (
                service, mounts)
            assert mounts["/weights"] == "/srv/models:/weights:ro", (service, mounts)
    assert with_weights >= (1 if name == "compose.client.yaml" else 4), name


def _compose_config(files: Sequence[str], env: dict[str, str]) -> dict:
    """`docker compose config` itself, on a clean environment (no GPU variables of the caller's)."""
    if shutil.which("docker") is None or _run(["docker", "compose", "version"], 60, check=False).returncode != 0:
        pytest.skip("docker compose is not installed: the YAML-level tests above cover this")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PFEDMMA_", "SUPERLINK_", "SUPERNODE_"))}
    args = [a for f in files for a in ("-f", str(REPO / f))]
    result = _run(["docker", "compose", *args, "config", "--format", "json"], 120, {**clean, **env})
    return json.loads(result.stdout)["services"]  # type: ignore[no-any-return]


def test_docker_compose_config_agrees() -> None:
    """The same, as Docker Compose resolves it (where the binary exists; no engine needed)."""
    defaults = _compose_config(["compose.yaml"], {})
    assert [_gpu_ids(defaults[s]) for s in CLIENTAPPS] == [["0"], ["1"], ["2"]]
    chosen = _compose_config(["compose.yaml"], {"PFEDMMA_GPU_0": "2", "PFEDMMA_GPU_1": "0", "PFEDMMA_GPU_2": "1"})
    assert [_gpu_ids(chosen[s]) for s in CLIENTAPPS] == [["2"], ["0"], ["1"]]
    assert not any("deploy" in spec for spec in _compose_config(["compose.yaml", "compose.cpu.yaml"], {}).values())
    client = _compose_config(["compose.client.yaml"], {**CLIENT_REQUIRED, "PFEDMMA_GPU": "4"})
    assert _gpu_ids(client["clientapp"]) == ["4"]
    cpu_client = _compose_config(["compose.client.yaml", "compose.client.cpu.yaml"], CLIENT_REQUIRED)
    assert "deploy" not in cpu_client["clientapp"]


def test_each_systemd_supernode_instance_names_its_own_gpu() -> None:
    """Without Docker the ClientApps inherit the SuperNode's environment: the per-instance env
    file is where an instance's GPU is chosen, numbered as nvidia-smi numbers them."""
    unit = (REPO / "docker" / "systemd" / "flower-supernode@.service").read_text()
    assert "EnvironmentFile=/etc/pfedmma/supernode-%i.env" in unit
    assert re.search(r"^Environment=CUDA_DEVICE_ORDER=PCI_BUS_ID$", unit, re.MULTILINE), unit
    template = (REPO / "docker" / "systemd" / "supernode.env").read_text()
    assert re.search(r"^CUDA_VISIBLE_DEVICES=\S+$", template, re.MULTILINE), template
