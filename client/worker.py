"""The node's warm worker: a long-lived process that runs ``client.work`` for the per-message
ClientApp processes of one (code, run config, node config), see ``client.warm``.

    python -m client.worker --socket DIR/KEY.sock --idle 300 --watch-pid PID

One message at a time, in the order they come. Between messages it keeps what ``client.runtime``
and ``common.data.eval_cache`` cache per process: imports, the CUDA context, the model, the data
shard and the decoded test images. Private tensors are read from and written to the node's disk by
``client.work`` exactly as in the ClientApp process; the worker keeps no other copy.

GPU memory (:func:`idle_action`): a GPU is shared by every run on the node, and each run config has
its own worker. The worker that served the node's latest GPU message is named in ``gpu-holder`` in
the worker directory. Any other worker holding GPU memory exits at once when idle (its CUDA context
cannot be freed otherwise), so a node never keeps more than one idle worker's model on a GPU; the
holder itself releases its models and GPU rows after ``--gpu-idle`` seconds without a message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import time
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.common import serde
from flwr.proto.message_pb2 import Message as ProtoMessage

from client import runtime, work
from client.warm import DEFAULT_GPU_IDLE_SECONDS, HEADER, recv_frame, send_frame

log = logging.getLogger("client.worker")
POLL_SECONDS = 2.0  # how often an idle worker checks its idle time and the watched process
HOLDER_FILE = "gpu-holder"


def idle_action(idle_seconds: float, gpu_idle: float, holds_gpu: bool, holder: int | None, me: int) -> str:
    """What an idle worker does about the GPU: ``"keep"``, ``"release"`` (models and GPU rows
    dropped) or ``"exit"`` (another worker served the node's latest GPU message)."""
    if not holds_gpu:
        return "keep"
    if holder is not None and holder != me:
        return "exit"
    return "release" if idle_seconds >= gpu_idle else "keep"


def read_holder(directory: Path) -> int | None:
    try:
        return int((directory / HOLDER_FILE).read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def claim_gpu(directory: Path) -> None:
    """Name this worker as the node's latest GPU user (atomically: readers never see half a pid)."""
    tmp = directory / f".{HOLDER_FILE}.{os.getpid()}"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, directory / HOLDER_FILE)


def decode_request(payload: bytes) -> tuple[ProtoMessage, Context]:
    (size,) = HEADER.unpack(payload[: HEADER.size])
    header = json.loads(payload[HEADER.size : HEADER.size + size])
    context = Context(
        run_id=int(header["run-id"]), node_id=int(header["node-id"]), node_config=header["node-config"],
        state=RecordDict(), run_config=header["run-config"],
    )
    return ProtoMessage.FromString(payload[HEADER.size + size :]), context


def serve_one(conn: socket.socket) -> None:
    proto, context = decode_request(recv_frame(conn))
    msg = serde.message_from_proto(proto)
    try:
        reply = work.handle(msg, context)
    except Exception as err:
        log.exception("message %s failed", msg.metadata.message_type)
        send_frame(conn, json.dumps({"status": "exception", "type": type(err).__name__, "reason": str(err)}).encode())
        send_frame(conn, b"")
        return
    if reply.has_error():
        send_frame(conn, json.dumps({"status": "error-reply", "code": reply.error.code, "reason": reply.error.reason}).encode())
        send_frame(conn, b"")
        return
    send_frame(conn, json.dumps({"status": "reply", "pid": os.getpid()}).encode())
    send_frame(conn, serde.recorddict_to_proto(reply.content).SerializeToString())


def _alive(pid: int) -> bool:
    if pid <= 1:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--idle", type=float, default=300.0, help="exit after this many seconds without a message")
    parser.add_argument("--watch-pid", type=int, default=0, help="exit when this process is gone (the SuperNode's side)")
    parser.add_argument("--gpu-idle", type=float, default=DEFAULT_GPU_IDLE_SECONDS,
                        help="release GPU memory after this many seconds without a message")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.umask(0o077)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    args.socket.unlink(missing_ok=True)
    server.bind(str(args.socket))
    server.listen(8)
    server.settimeout(POLL_SECONDS)
    log.info("warm worker %d listening on %s (idle limit %.0f s)", os.getpid(), args.socket, args.idle)
    last = time.monotonic()
    directory = args.socket.parent
    try:
        while time.monotonic() - last < args.idle and _alive(args.watch_pid):
            try:
                conn, _ = server.accept()
            except TimeoutError:
                action = idle_action(time.monotonic() - last, args.gpu_idle, runtime.uses_gpu(),
                                     read_holder(directory), os.getpid())
                if action == "exit":
                    log.info("another worker uses the GPU now: exiting to free this one's GPU memory")
                    break
                if action == "release" and runtime.holds_device_memory():
                    log.info("idle for %.0f s: releasing GPU memory", time.monotonic() - last)
                    runtime.release_device_memory()
                continue
            with conn:
                conn.settimeout(None)
                try:
                    serve_one(conn)
                except (ConnectionError, OSError) as err:  # the ClientApp went away mid-message
                    log.warning("connection lost: %s", err)
            if runtime.uses_gpu():
                claim_gpu(directory)
            last = time.monotonic()
    finally:
        server.close()
        args.socket.unlink(missing_ok=True)
        log.info("warm worker %d exits", os.getpid())


if __name__ == "__main__":
    main()
