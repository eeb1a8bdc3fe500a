"""A test host: pages a scan test needs, served from a container on the test's own internal
docker network (never reachable from anywhere else). stdlib only; runs as `python3 server.py`."""

from __future__ import annotations

import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BENIGN = b"""<!doctype html><html><head><title>Benign test page</title></head>
<body><h1>Hello</h1><p>Nothing to see.</p><a href="/about">About</a></body></html>"""

LOGIN_CROSS = b"""<!doctype html><html><head><title>Sign in</title></head><body>
<form action="http://site-b.test/collect" method="post">
<input name="user"><input type="password" name="pw"><button>Sign in</button></form>
</body></html>"""

META_REFRESH = b"""<!doctype html><html><head><title>Moving</title>
<meta http-equiv="refresh" content="0; url=http://site-b.test/"></head><body>moved</body></html>"""

# A refresh after a long delay: the fetcher records it but does not follow it.
META_REFRESH_DELAYED = b"""<!doctype html><html><head><title>Later</title>
<meta http-equiv="refresh" content="60; url=http://site-b.test/"></head><body>wait</body></html>"""

OBFUSCATED = (b"<!doctype html><html><head><title>x</title><script>var p='"
              + b"QUJD" * 120 + b"';eval(atob(p));eval(unescape('%61'));"
              b"document.write(String.fromCharCode(60,105));</script></head><body>"
              b"<iframe src='http://site-b.test/' width='0' height='0' style='display:none'>"
              b"</iframe></body></html>")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "text/html; charset=utf-8",
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str, status: int = 302) -> None:
        self._send(status, b"", extra={"Location": location})

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path in ("/", "/about"):
            self._send(200, BENIGN)
        elif path == "/slow":  # a slow but healthy page
            time.sleep(2)
            self._send(200, BENIGN)
        elif path == "/hang":  # accept, then never answer
            time.sleep(600)
        elif path == "/drip":  # headers at once, then a byte a second
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(600):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(1)
        elif path == "/big":  # 50 MiB body
            chunk = b"a" * 65536
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(50 * 1024 * 1024))
            self.end_headers()
            try:
                for _ in range(800):
                    self.wfile.write(chunk)
            except OSError:
                pass  # the fetcher stops reading at its cap
        elif path == "/login":
            self._send(200, LOGIN_CROSS)
        elif path == "/meta":
            self._send(200, META_REFRESH)
        elif path == "/nul-title":  # PostgreSQL refuses NUL in text and jsonb
            self._send(200, b"<html><head><title>Nul\x00Title</title></head><body>x</body></html>")
        elif path == "/meta-delayed":
            self._send(200, META_REFRESH_DELAYED)
        elif path == "/obfuscated":
            self._send(200, OBFUSCATED)
        elif path == "/download.exe":
            self._send(200, b"MZ" + b"\0" * 1024, ctype="application/x-msdownload",
                       extra={"Content-Disposition": 'attachment; filename="setup.exe"'})
        elif path == "/chain":  # crosses to another registrable domain
            self._redirect("http://site-b.test/chain2", 301)
        elif path == "/chain2":
            self._redirect("http://site-c.test/")
        elif path.startswith("/to/"):  # open redirect: /to/<url>
            self._redirect(self.path[len("/to/"):])
        else:
            self._send(404, b"not found")


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 80
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
