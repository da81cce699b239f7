"""The ClientApp's side of the node's warm worker: find it, start it, hand it a message.

Flower 1.41 starts a new ``flwr-clientapp`` process for every message (there is no long-running
ClientApp), and that process used to pay torch's and open_clip's imports, CUDA start-up, the model
build and the test images' decoding before a step that takes a fraction of that. A warm worker
(``client.worker``) is a process on the same node that pays them once and runs ``client.work`` for
the per-message processes.

* **Keyed** by the app's code (a hash of its source files as Flower unpacked them), the run config,
  the node config and the Python interpreter: other code or another run gets its own worker.
* **Local only**: it listens on a Unix socket in a directory that only this user can open (0700),
  so the message (and the private adapters it loads from the node's disk) never leave the node;
  replies are built by the same code as without a worker, from the shared role only.
* **Degrades**: if the worker cannot be started or reached, or fails during a message, the message
  runs in the ClientApp process as before, with one warning.
* **Exits** after ``warm-worker-idle`` seconds without a message (node config; default 300), or when
  the process that started its first ClientApp (the SuperNode or its SuperExec) is gone.
* **GPU memory**: releases its models and GPU rows after ``warm-worker-gpu-idle`` seconds without a
  message (default 120); a worker whose GPU another worker has used since exits (``client.worker``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.common import serde
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]  # where Flower unpacked the app (or the repository)
PACKAGES = ("client", "common")
DEFAULT_IDLE_SECONDS = 300.0
DEFAULT_GPU_IDLE_SECONDS = 120.0  # then an idle worker releases its GPU memory (client.worker)
START_TIMEOUT = 300.0  # imports and the first model build, on a busy node
DEFAULT_MESSAGE_TIMEOUT = 3600.0  # the run config's round-timeout default
HEADER = struct.Struct("!Q")


def enabled(context: Context) -> bool:
    """On in a deployment's per-message ``flwr-clientapp`` process unless ``warm-worker = false``;
    off in simulation, where Ray actors already live across messages."""
    if Path(sys.argv[0]).name != "flwr-clientapp":
        return False
    return str(context.node_config.get("warm-worker", True)).lower() not in ("false", "0", "no")


def code_version(root: Path = ROOT) -> str:
    """A hash of the app's source files: a worker only serves the code it runs."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def worker_key(context: Context) -> str:
    identity = {
        "code": code_version(),
        "run-config": {k: str(v) for k, v in sorted(context.run_config.items())},
        "node-config": {k: str(v) for k, v in sorted(context.node_config.items())},
        "python": sys.executable,
        "path": sys.path,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def private_dir(node_config: Mapping[str, Any]) -> Path:
    """The sockets' directory: the node's ``warm-worker-dir``, else one per user under the temp
    directory; created 0700, and refused if another user owns it or can open it."""
    configured = str(node_config.get("warm-worker-dir", ""))
    path = Path(configured).expanduser() if configured else Path(tempfile.gettempdir()) / f"pfedmma-warm-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise PermissionError(f"warm-worker directory {path} must be owned by uid {os.getuid()} and mode 0700")
    return path


# -- framing: an 8-byte length, then the bytes -----------------------------------------------------


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(HEADER.pack(len(payload)) + payload)


def recv_frame(sock: socket.socket) -> bytes:
    (size,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    return _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the warm worker closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def encode_request(msg: Message, context: Context) -> bytes:
    header = json.dumps(
        {"run-id": context.run_id, "node-id": context.node_id, "node-config": dict(context.node_config),
         "run-config": dict(context.run_config)}
    ).encode()
    return HEADER.pack(len(header)) + header + serde.message_to_proto(msg).SerializeToString()


# -- the ClientApp's side ----------------------------------------------------------------------


def handle(msg: Message, context: Context) -> Message | None:
    """The worker's reply to ``msg``, or None when the caller should run it itself."""
    try:
        directory = private_dir(context.node_config)
        key = worker_key(context)
        sock = _connect(directory / f"{key}.sock")
        if sock is None:
            sock = _start(directory, key, context)
        if sock is None:
            return None
        # As long as the server waits for the reply: a shorter limit would run a slow message
        # a second time here while the worker still trains it.
        sock.settimeout(float(context.run_config.get("round-timeout", DEFAULT_MESSAGE_TIMEOUT)))
        with sock:
            send_frame(sock, encode_request(msg, context))
            answer = json.loads(recv_frame(sock))
            body = recv_frame(sock)
    except Exception as err:  # noqa: BLE001 - any worker trouble: run the message here instead
        log.warning("warm worker unavailable (%s: %s); running this message in the ClientApp process", type(err).__name__, err)
        return None
    if answer["status"] == "reply":
        content = serde.recorddict_from_proto(ProtoRecordDict.FromString(body))
        return Message(content=content, reply_to=msg)
    if answer["status"] == "error-reply":  # a permanent error the handler turned into a reply
        return Message(Error(code=int(answer["code"]), reason=str(answer["reason"])), reply_to=msg)
    # The handler raised: raise here too, so Flower reports the ClientApp failure as it would have.
    raise RuntimeError(f"{answer.get('type', 'Exception')} in the warm worker: {answer.get('reason', '')}")


def _connect(path: Path) -> socket.socket | None:
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _private_file(path: Path, flags: int) -> int:
    """A descriptor of ``path``, created 0600: the logs name the node's data and state paths."""
    return os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)


@contextlib.contextmanager
def _spawn_lock(directory: Path, key: str) -> Iterator[None]:
    with open(_private_file(directory / f"{key}.lock", os.O_WRONLY | os.O_APPEND), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _start(directory: Path, key: str, context: Context) -> socket.socket | None:
    """Start the worker for ``key`` (one at a time per key) and connect once it listens."""
    path = directory / f"{key}.sock"
    with _spawn_lock(directory, key):
        sock = _connect(path)  # another ClientApp may have started it meanwhile
        if sock is not None:
            return sock
        idle = float(context.node_config.get("warm-worker-idle", DEFAULT_IDLE_SECONDS))
        gpu_idle = float(context.node_config.get("warm-worker-gpu-idle", DEFAULT_GPU_IDLE_SECONDS))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        with open(_private_file(directory / f"{key}.log", os.O_WRONLY | os.O_APPEND), "ab") as logfile:
            worker = subprocess.Popen(
                [sys.executable, "-m", "client.worker", "--socket", str(path), "--idle", str(idle), "--gpu-idle", str(gpu_idle),
                 "--watch-pid", str(os.getppid())],
                cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                start_new_session=True,  # outlives this per-message process
            )
        log.info("started warm worker %d (%s)", worker.pid, path)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            sock = _connect(path)
            if sock is not None:
                return sock
            if worker.poll() is not None:
                raise RuntimeError(f"the warm worker exited with status {worker.returncode}; see {directory / (key + '.log')}")
            time.sleep(0.1)
        worker.kill()
        raise TimeoutError(f"the warm worker did not listen within {START_TIMEOUT:.0f} s")
