"""The node's warm worker: a long-lived process that runs ``client.work`` for the per-message
ClientApp processes of one (code, run config, node config), see ``client.warm``.

    python -m client.worker --socket DIR/KEY.sock --idle 300 --watch-pid PID

One message at a time, in the order they come. Between messages it keeps what ``client.runtime``
and ``common.data.eval_cache`` cache per process: imports, the CUDA context, the model, the data
shard and the decoded test images. Private tensors are read from and written to the node's disk by
``client.work`` exactly as in the ClientApp process; the worker keeps no other copy.
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

from client import work
from client.warm import HEADER, recv_frame, send_frame

log = logging.getLogger("client.worker")
POLL_SECONDS = 2.0  # how often an idle worker checks its idle time and the watched process


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
    try:
        while time.monotonic() - last < args.idle and _alive(args.watch_pid):
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    serve_one(conn)
                except (ConnectionError, OSError) as err:  # the ClientApp went away mid-message
                    log.warning("connection lost: %s", err)
            last = time.monotonic()
    finally:
        server.close()
        args.socket.unlink(missing_ok=True)
        log.info("warm worker %d exits", os.getpid())


if __name__ == "__main__":
    main()
