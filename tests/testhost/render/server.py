"""A test host for the browser sandbox's tests (tests/test_browser_image.py): pages that only a
browser understands, served from a container on the test's own internal docker network.

Every connection and every request line is printed to stdout (`docker logs`), so a test can
prove that a host the proxy refused never received anything. stdlib only: `python3 server.py`.
"""

from __future__ import annotations

import ssl
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A one-colour PNG, built by hand (no imaging library in the test host)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    row = b"\x00" + bytes(rgb) * width
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


ICON = _png(16, 16, (200, 30, 30))
PIXEL = _png(1, 1, (0, 0, 0))

# The form exists only after the script ran: a static fetch sees an empty <div>.
SCRIPT_LOGIN = b"""<!doctype html><html><head><title>Account</title>
<link rel="icon" href="/icon.png">
<style>body{background:#1a4d8f;color:#fff;font:24px sans-serif}
#app{margin:40px;padding:30px;background:#f4c20d;color:#000;width:500px}</style></head>
<body><h1>Verify your account</h1><div id="app"></div>
<script>
var f = document.createElement('form');
f.action = 'http://site-b.test/collect'; f.method = 'post';
f.innerHTML = '<label>E-mail <input type="email" name="email"></label>' +
  '<label>Password <input type="password" name="pass"></label><button>Sign in</button>';
document.getElementById('app').appendChild(f);
console.log('form built');
document.cookie = 'session=abc123; path=/';
</script></body></html>"""

# A redirect no static fetcher follows: a timer, then location.
TIMED = b"""<!doctype html><html><head><title>Please wait</title></head><body>
<p>Loading...</p><script>setTimeout(function () {
  window.location.href = 'http://site-b.test/landing';
}, 300);</script></body></html>"""

LANDING = b"""<!doctype html><html><head><title>Landing</title></head>
<body style="background:#0a0"><h1>Arrived</h1></body></html>"""

# Sub-resources from a host the sandbox must refuse (its address is not allowed).
# Also taller than the full-page screenshot's cap (2048 px).
REFUSED_IMAGE = b"""<!doctype html><html><head><title>Image</title></head><body>
<h1>Picture</h1><img src="http://refused.test/pixel.png?from=img" width="10" height="10">
<div style="height:6000px;background:linear-gradient(#fff,#c00)">tall</div>
</body></html>"""

# A header redirect, then a meta refresh to another domain.
META_HOP = b"""<!doctype html><html><head><title>Moving</title>
<meta http-equiv="refresh" content="0; url=http://site-b.test/landing"></head><body>moving</body>
</html>"""

# A download started by script: recorded with its hash, never kept.
DOWNLOAD_PAGE = b"""<!doctype html><html><head><title>Get it</title></head><body>
<a id="d" href="/file.bin" download>setup</a>
<script>document.getElementById('d').click();</script></body></html>"""
DOWNLOAD = b"MZ" + bytes(range(256)) * 64

REFUSED_WS = b"""<!doctype html><html><head><title>Socket</title></head><body><h1>Socket</h1>
<script>
var ws = new WebSocket('ws://refused.test/ws?from=ws');
ws.onerror = function () { console.log('websocket error'); };
</script></body></html>"""

PAGES = {"/script-login": SCRIPT_LOGIN, "/timed": TIMED, "/landing": LANDING,
         "/refused-image": REFUSED_IMAGE, "/refused-ws": REFUSED_WS, "/meta-hop": META_HOP,
         "/download": DOWNLOAD_PAGE}
IMAGES = {"/icon.png": ICON, "/favicon.ico": ICON, "/pixel.png": PIXEL}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        print(f"CONNECT-FROM {self.client_address[0]}", flush=True)

    def log_message(self, fmt: str, *args: object) -> None:  # the request line is logged below
        pass

    def _send(self, body: bytes, ctype: str, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        print(f"REQUEST {self.command} {self.headers.get('Host', '')} {self.path}", flush=True)
        path = self.path.split("?")[0]
        if path in PAGES:
            self._send(PAGES[path], "text/html; charset=utf-8")
        elif path in IMAGES:
            self._send(IMAGES[path], "image/png")
        elif path == "/hop":
            self.send_response(302)
            self.send_header("Location", "/meta-hop")
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
        elif path == "/file.bin":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Disposition", 'attachment; filename="setup.exe"')
            self.send_header("Content-Length", str(len(DOWNLOAD)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(DOWNLOAD)
        else:
            self._send(b"not found", "text/plain", 404)

    do_POST = do_GET


def main() -> None:
    """`server.py PORT [TLS_PORT CERT KEY]`: HTTP, and HTTPS too when a certificate is given."""
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 80
    ThreadingHTTPServer.daemon_threads = True
    if len(sys.argv) > 4:
        tls = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[3], sys.argv[4])
        tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
        threading.Thread(target=tls.serve_forever, daemon=True).start()
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
