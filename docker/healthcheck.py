#!/opt/venv/bin/python
"""Container health check: is a Flower HTTP API (SuperLink or SuperNode) answering?

    healthcheck PORT [HOST]

Flower 1.41 serves ``GET /health`` on the SuperLink's API port and on each SuperNode's
Runtime API port. The port answers plain HTTP, or HTTPS when the component was started
with TLS; both are tried. The check runs inside the container against its own port, so
the certificate is not verified here (the real clients verify it).
"""

from __future__ import annotations

import ssl
import sys
import urllib.request


def healthy(host: str, port: int) -> bool:
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    for scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{scheme}://{host}:{port}/health", timeout=3, context=unverified) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            continue
    return False


def main(argv: list[str]) -> int:
    if not 2 <= len(argv) <= 3 or not argv[1].isdigit():
        print("usage: healthcheck PORT [HOST]", file=sys.stderr)
        return 2
    host = argv[2] if len(argv) == 3 else "127.0.0.1"
    ok = healthy(host, int(argv[1]))
    print("healthy" if ok else f"no answer from /health on {host}:{argv[1]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
