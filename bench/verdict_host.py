"""The test host of `python -m bench.verdicts`: serves every labelled page at its own host name.

Runs inside a container on the benchmark's internal docker network (every page host is a network
alias of this container), stdlib only: `python3 verdict_host.py /pages`. `/pages/index.json` maps
"<host> <path>" (host in its DNS form, path percent-decoded) to a file and its Content-Type.
With `/pages/tls/cert.pem` and `key.pem` present it also serves the same pages over TLS on 443.
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else "/pages")
INDEX: dict[str, dict[str, str]] = json.loads((ROOT / "index.json").read_text())
NOT_FOUND = b"<!doctype html><html><head><title>Not found</title></head><body>404</body></html>"


def key(host: str, target: str) -> str:
    host = host.strip().lower().rsplit(":", 1)[0] if not host.endswith("]") else host.lower()
    path = urllib.parse.unquote(urllib.parse.urlsplit(target).path or "/")
    return f"{host} {path}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        entry = INDEX.get(key(self.headers.get("Host", ""), self.path))
        status, body, ctype = 404, NOT_FOUND, "text/html; charset=utf-8"
        if entry is not None:
            status, body, ctype = 200, (ROOT / entry["file"]).read_bytes(), entry["type"]
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


def serve_tls(cert: Path, key_file: Path) -> None:
    server = ThreadingHTTPServer(("0.0.0.0", 443), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key_file)
    # The handshake happens in the handler thread, not in accept(): a slow client stalls none.
    server.socket = ctx.wrap_socket(server.socket, server_side=True,
                                    do_handshake_on_connect=False)
    server.serve_forever()


def main() -> None:
    ThreadingHTTPServer.daemon_threads = True
    tls = ROOT / "tls"
    if (tls / "cert.pem").is_file():
        threading.Thread(target=serve_tls, args=(tls / "cert.pem", tls / "key.pem"),
                         daemon=True).start()
    ThreadingHTTPServer(("0.0.0.0", 80), Handler).serve_forever()


if __name__ == "__main__":
    main()
