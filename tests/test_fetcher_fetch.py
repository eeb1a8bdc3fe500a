"""The fetcher against local servers on 127.0.0.1 (ephemeral ports, allowed via FETCH_ALLOW_CIDRS).

Redirects to refused targets are refused by the address check before any connection, so these
tests only ever talk to loopback.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from safeurl_worker.fetcher import fetch
from safeurl_worker.models import Report

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024

BENIGN = b"""<!doctype html><html><head><title>  Welcome
  home </title><base href="/sub/">
<meta http-equiv="Refresh" content="30; url=/home">
<script src="https://cdn.example/lib.js"></script><script src="app.js"></script>
<script>var x = eval("1"); var y = atob('aGk='); document.write(unescape('%41'));
String.fromCharCode(72, 105); window.location.href = "https://evil.example/go";
location.replace('/next'); var b = "%s";</script>
</head><body>
<form action="login.php" method="POST"><input name=u><input type="Password" name=p></form>
<form><input type=text></form>
<iframe src="https://ads.example/x" width="0" height="0"></iframe>
<iframe src="/visible" width="300"></iframe>
<iframe src="/styled" style="display: none"></iframe>
<iframe src="/attr" hidden></iframe>
<a href="/a">a</a><a href="/b">b</a><a name="no-href">c</a>
</body></html>""".replace(b"%s", b"QUJD" * 60)


LOGIN = b"""<title>Sign in</title><form action=/post method=post><input type=email>
<input type=password></form>"""
BOMB = gzip.compress(b"<title>bomb</title>" + b" " * (8 * MIB), compresslevel=9)
HTML = ("Content-Type", "text/html")


def _hostile_page() -> bytes:
    """Every list at its bound, every string long and non-ASCII: far over 1 MiB of report."""
    wide = "\u00e9\u4e2d" * 600  # percent-encoded in URLs: 9000 characters, cut to 8192
    parts = [f'<link rel=stylesheet href="/{wide}{i}"><link rel=icon href="/{wide}i{i}">'
             f'<h1>{wide}{i}</h1><button>{wide}{i}</button>' for i in range(50)]
    parts += [f'<form action="/{wide}{i}"><label>{wide}<input name=email></label></form>'
              f'<iframe src="/{wide}{i}"></iframe><script src="/{wide}{i}"></script>'
              f'<img src="/{wide}{i}" alt="{wide}">' for i in range(50)]
    parts.append(f"<script>location.href='/{wide}'</script><p>{wide}</p>")
    return "".join(parts).encode()


# route -> (status, headers, body) for the Content-Encoding, Refresh and sniffing tests
EXTRA: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {
    "/gzip": (200, [HTML, ("Content-Encoding", "gzip")], gzip.compress(LOGIN)),
    "/deflate": (200, [HTML, ("Content-Encoding", "deflate")], zlib.compress(LOGIN)),
    "/raw-deflate": (200, [HTML, ("Content-Encoding", "deflate")],
                     zlib.compress(LOGIN)[2:-4]),  # raw deflate, as IIS sends it
    "/bomb": (200, [HTML, ("Content-Encoding", "gzip")], BOMB),
    "/br": (200, [HTML, ("Content-Encoding", "br")], b"\x1b\x00\x00"),
    "/refresh-header": (200, [("Content-Type", "text/plain"), ("Refresh", "0; url=/page")],
                        b"moved"),
    "/sniff": (200, [], b"\n <div><form><input type=password></form></div>"),
    "/text-plain": (200, [("Content-Type", "text/plain")], b"<div><form></form></div>"),
    "/latin1": (200, [("Content-Type", "text/html; charset=idna")],
                "<title>Caf\u00e9</title>".encode("latin-1")),
    "/hostile": (200, [HTML], _hostile_page()),
    "/long-redirect": (302, [("Location", "/" + "\u00e9" * 9000)], b""),
    # http.server sends header values as Latin-1: these are the UTF-8 bytes of /caf\u00e9
    "/utf8-redirect": (302, [("Location", "/caf\u00e9".encode().decode("latin-1"))], b""),
}


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes of the local test site; `seen` keeps the request headers of every request."""

    protocol_version = "HTTP/1.1"
    seen: list[dict[str, str]] = []
    blocked_target = "http://localhost/"

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output quiet
        pass

    def do_GET(self) -> None:
        Handler.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        route = self.path.split("?")[0]
        if route.startswith("/hop/"):  # /hop/N answers 301, 302, 307, 308 for N = 1..4
            n = int(route.rsplit("/", 1)[1])
            status = (301, 302, 307, 308)[(n - 1) % 4]
            return self.redirect(status, f"/hop/{n - 1}" if n > 1 else "/page")
        if route == "/page":
            return self.send(200, BENIGN)
        if route == "/meta":
            return self.send(200, b'<meta http-equiv="refresh" content="3;url=\'/page\'">')
        if route == "/self-refresh":
            return self.send(200, b'<title>t</title><meta http-equiv=refresh content="5">')
        if route == "/blocked":
            return self.redirect(302, self.blocked_target)
        if route == "/loop":
            return self.redirect(302, "/loop")
        if route == "/big":
            return self.send(200, b"x" * (5 * MIB), "application/octet-stream")
        if route == "/big-unsized":  # no Content-Length: the body ends when the server closes
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"y" * (5 * MIB))
            return None
        if route in EXTRA:
            status, headers, body = EXTRA[route]
            return self.send_with(status, headers, body)
        return self.send(404, b"not found", "text/plain")

    def send_with(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def redirect(self, status: int, location: str) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send(self, status: int, body: bytes, ctype: str = "text/html; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Many", "v" * 5000)
        self.end_headers()
        with contextlib.suppress(OSError):  # the fetcher stops reading at its byte cap
            self.wfile.write(body)


@pytest.fixture
def site() -> Iterator[int]:
    Handler.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def serve_raw(handle: Callable[[socket.socket], None],
              wrap: ssl.SSLContext | None = None) -> tuple[int, Callable[[], None]]:
    """A one-connection-at-a-time TCP server on 127.0.0.1 running `handle`; returns port, stop."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(OSError, ssl.SSLError), conn:
                handle(wrap.wrap_socket(conn, server_side=True) if wrap else conn)

    threading.Thread(target=loop, daemon=True).start()

    def close() -> None:
        stop.set()
        listener.close()

    return listener.getsockname()[1], close


def env_for(port: int, **extra: str) -> dict[str, str]:
    env = {"FETCH_ALLOWED_PORTS": str(port), "FETCH_ALLOW_CIDRS": "127.0.0.0/8",
           "FETCH_TIMEOUT_S": "5"}
    env.update(extra)
    return env


def scan(url: str, env: dict[str, str], **kwargs: Any) -> dict[str, Any]:
    """Run the fetcher in-process and check the report against the worker's strict model."""
    report = fetch.run(url, env, **kwargs)
    Report.model_validate_json(json.dumps(report))
    return report


def test_benign_page_features(site: int) -> None:
    report = scan(f"http://127.0.0.1:{site}/page", env_for(site))
    base = f"http://127.0.0.1:{site}"
    assert report["error"] is None
    assert (report["http_status"], report["final_url"]) == (200, f"{base}/page")
    assert report["title"] == "Welcome home"
    assert report["connected_address"] == "127.0.0.1"
    assert report["resolved_addresses"] == ["127.0.0.1"]
    assert report["body_size"] == len(BENIGN) and not report["body_truncated"]
    assert report["sha256"] == hashlib.sha256(BENIGN).hexdigest()
    assert report["content_type"] == "text/html; charset=utf-8"
    assert len(report["headers"]["x-many"]) == 2048
    f = report["features"]
    assert f["parse"] == "full" and f["parse_problem"] is None
    no = {"has_email": False, "has_card": False, "has_otp": False, "text": ""}
    assert f["forms"] == [  # an empty action is the document's URL, not <base href>
        {"action": f"{base}/sub/login.php", "method": "post", "has_password": True, **no},
        {"action": f"{base}/page", "method": "get", "has_password": False, **no},
    ]
    assert [(i["src"], i["hidden"]) for i in f["iframes"]] == [
        ("https://ads.example/x", True), (f"{base}/visible", False),
        (f"{base}/styled", True), (f"{base}/attr", True)]
    assert f["meta_refresh"] == f"{base}/home"
    assert f["external_scripts"] == ["https://cdn.example/lib.js", f"{base}/sub/app.js"]
    assert f["js_redirects"] == ["https://evil.example/go", f"{base}/next"]
    assert f["links_count"] == 2
    s = f["scripts"]
    assert (s["inline_count"], s["eval_count"], s["atob_count"]) == (1, 1, 1)
    assert s["unescape_count"] == 1
    assert (s["fromcharcode_count"], s["document_write_count"], s["long_base64_runs"]) == (1, 1, 1)
    assert s["max_line_length"] >= 240
    assert report["redirects"] == []  # a 30 s refresh is recorded, not followed
    sent = Handler.seen[0]
    assert sent["host"] == f"127.0.0.1:{site}"
    assert sent["user-agent"] == fetch.USER_AGENT and "Mozilla/5.0" in sent["user-agent"]
    assert "SafeURL" not in json.dumps(sent)  # nothing announces the scanner
    assert (sent["accept-encoding"], sent["connection"]) == ("gzip, deflate", "close")
    assert report["truncated"] == {}


def test_redirect_chain_is_recorded(site: int) -> None:
    report = scan(f"http://127.0.0.1:{site}/hop/4", env_for(site, FETCH_MAX_REDIRECTS="5"))
    base = f"http://127.0.0.1:{site}"
    hops = [(h["url"], h["status"], h["location"], h["kind"]) for h in report["redirects"]]
    assert hops == [(f"{base}/hop/4", 308, f"{base}/hop/3", "http"),
                    (f"{base}/hop/3", 307, f"{base}/hop/2", "http"),
                    (f"{base}/hop/2", 302, f"{base}/hop/1", "http"),
                    (f"{base}/hop/1", 301, f"{base}/page", "http")]
    assert report["final_url"] == f"{base}/page"
    assert report["http_status"] == 200
    assert report["title"] == "Welcome home"


def test_meta_refresh_is_followed(site: int) -> None:
    report = scan(f"http://127.0.0.1:{site}/meta", env_for(site))
    base = f"http://127.0.0.1:{site}"
    assert report["redirects"][0] == {"url": f"{base}/meta", "status": None,
                                      "location": f"{base}/page", "kind": "meta"}
    assert report["title"] == "Welcome home"


def test_self_refresh_is_not_a_redirect(site: int) -> None:
    report = scan(f"http://127.0.0.1:{site}/self-refresh", env_for(site))
    assert report["error"] is None and report["redirects"] == []
    assert report["features"]["meta_refresh"] is None and report["title"] == "t"


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("http://localhost/", "localhost"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://[::ffff:a9fe:a9fe]/", "169.254.169.254"),
        ("http://0x7f.1:{port}/page", "loopback"),  # loopback without the allowance
        ("http://127.0.0.1:22/", "port 22"),  # allowed network, disallowed port
    ],
)
def test_redirect_to_a_blocked_target(site: int, target: str, why: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Handler, "blocked_target", target.format(port=site))
    env = env_for(site, FETCH_ALLOWED_PORTS=f"80,{site}")
    if why == "loopback":
        env["FETCH_ALLOW_CIDRS"] = "127.0.0.1/32"  # the first hop only
        monkeypatch.setattr(Handler, "blocked_target", f"http://127.0.0.2:{site}/page")
    report = scan(f"http://127.0.0.1:{site}/blocked", env)
    assert report["error"]["code"] == "BLOCKED_TARGET"
    assert why in report["error"]["message"] or "127.0.0.2" in report["error"]["message"]
    assert len(report["redirects"]) == 1 and report["redirects"][0]["status"] == 302
    assert report["http_status"] == 302  # the last response actually received
    assert [r["path"] for r in Handler.seen] == ["/blocked"]  # nothing else was requested


def test_too_many_redirects(site: int) -> None:
    report = scan(f"http://127.0.0.1:{site}/loop", env_for(site, FETCH_MAX_REDIRECTS="3"))
    assert report["error"]["code"] == "TOO_MANY_REDIRECTS"
    assert len(report["redirects"]) == 4
    assert len(Handler.seen) == 4


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
def test_body_is_capped(site: int, path: str) -> None:
    report = scan(f"http://127.0.0.1:{site}{path}", env_for(site, FETCH_MAX_BYTES=str(MIB)))
    assert report["error"] is None
    assert (report["body_size"], report["body_truncated"]) == (MIB, True)
    byte = b"x" if path == "/big" else b"y"
    assert report["sha256"] == hashlib.sha256(byte * MIB).hexdigest()


def _drip(head: bytes) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(head)
        for _ in range(100):  # one byte every 50 ms: never idle long enough for a socket timeout
            conn.sendall(b"a")
            time.sleep(0.05)

    return handle


def _scan_drip(head: bytes) -> tuple[dict[str, Any], float]:
    """Scan a server that sends `head` and then drips, with a 1 s fetch deadline."""
    port, stop = serve_raw(_drip(head))
    try:
        start = time.monotonic()
        report = scan(f"http://127.0.0.1:{port}/", env_for(port, FETCH_TIMEOUT_S="1"))
        return report, time.monotonic() - start
    finally:
        stop()


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<title>x", 200),  # body drip
        (b"HTTP/1.1 200 OK\r\nX-Slow: ", None),  # header drip
    ],
)
def test_slow_drip_times_out_at_the_deadline(head: bytes, status: int | None) -> None:
    report, elapsed = _scan_drip(head)
    assert report["error"]["code"] == "READ_TIMEOUT"
    assert 0.9 < elapsed < 2.0
    assert report["http_status"] == status
    if status:
        assert report["body_size"] > 0  # the partial page is kept and scanned
        assert report["title"].startswith("xa")


def test_superlinear_page_cut_by_the_deadline_still_reports_in_time() -> None:
    """A page that is slow to parse arriving as the deadline passes: the body read ends at the
    deadline, the parse has its minimum budget, and the report (partial, with what was parsed)
    is out before the last-resort alarm (deadline + 2 s)."""
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<title>Bank</title>"
            b"<form><input type=password></form>" + b"<div>" * 300_000)
    report, elapsed = _scan_drip(head)
    assert report["error"]["code"] == "READ_TIMEOUT"
    assert elapsed < 1 + 2, elapsed
    f = report["features"]
    assert report["title"] == "Bank" and f["forms"][0]["has_password"]
    assert f["parse"] == "partial" and "time budget" in f["parse_problem"]


def test_connection_refused() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = scan(f"http://127.0.0.1:{port}/", env_for(port))
    assert report["error"]["code"] == "CONNECT_FAILED"
    assert report["final_url"] is None and report["http_status"] is None


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=site-a.test", "-addext", "subjectAltName=DNS:site-a.test,IP:127.0.0.1",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True, timeout=30)
    return d


@pytest.fixture
def self_signed(cert_dir: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_dir / "cert.pem", cert_dir / "key.pem")
    return ctx


def _hello(conn: socket.socket) -> None:
    conn.recv(65536)
    body = b"<title>secure</title>"
    head = f"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {len(body)}\r\n\r\n"
    conn.sendall(head.encode() + body)


def test_tls_verified_with_sni_of_the_original_name(
        self_signed: ssl.SSLContext, cert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust the test CA only: the fetcher connects to 127.0.0.1 but verifies `site-a.test`."""
    names: list[str | None] = []
    self_signed.sni_callback = lambda sock, name, ctx: names.append(name)
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context",  # the module fetch.py calls it through
                        lambda: real(cafile=str(cert_dir / "cert.pem")))
    port, stop = serve_raw(_hello, wrap=self_signed)
    try:
        report = scan(f"https://site-a.test:{port}/", env_for(port),
                      resolver=lambda host, p: ["127.0.0.1"])
        wrong = scan(f"https://site-b.test:{port}/", env_for(port),
                     resolver=lambda host, p: ["127.0.0.1"])
    finally:
        stop()
    assert report["error"] is None and report["title"] == "secure"
    assert report["tls"]["verified"] is True and report["tls"]["version"].startswith("TLS")
    assert names[0] == "site-a.test"
    assert wrong["error"]["code"] == "TLS_ERROR" and "site-b.test" in wrong["tls"]["error"]


def test_self_signed_tls_is_a_tls_error(self_signed: ssl.SSLContext) -> None:
    port, stop = serve_raw(_hello, wrap=self_signed)
    try:
        report = scan(f"https://127.0.0.1:{port}/", env_for(port))
    finally:
        stop()
    assert report["error"]["code"] == "TLS_ERROR"
    assert report["tls"]["verified"] is False
    assert "certificate" in report["tls"]["error"]


def test_plain_http_on_a_tls_url_is_a_tls_error(site: int) -> None:
    report = scan(f"https://127.0.0.1:{site}/", env_for(site))
    assert report["error"]["code"] == "TLS_ERROR"


def test_named_host_resolved_once_and_sent_as_host_header(site: int) -> None:
    calls: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"]

    report = scan(f"http://Site-A.test:{site}/hop/1", env_for(site), resolver=resolver)
    assert report["error"] is None and report["final_url"] == f"http://site-a.test:{site}/page"
    assert calls == ["site-a.test", "site-a.test"]  # once per hop, never by the HTTP client
    assert {r["host"] for r in Handler.seen} == {f"site-a.test:{site}"}


def test_dns_failure_and_invalid_url_are_reports() -> None:
    def nxdomain(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    assert scan("http://nx.test/", {}, resolver=nxdomain)["error"]["code"] == "DNS_FAILED"
    bad = scan("gopher://127.0.0.1/", {})
    assert bad["error"]["code"] == "INVALID_URL" and bad["final_url"] is None


def test_bad_config_is_an_internal_error_report() -> None:
    report = scan("http://93.184.216.34/", {"FETCH_MAX_BYTES": "lots"})
    assert report["error"]["code"] == "INTERNAL_ERROR"
    assert "FETCH_" in report["error"]["message"]


def run_module(url: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-s", "-m", "safeurl_worker.fetcher", url],
                          capture_output=True, text=True, timeout=30, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", **env})


def test_module_prints_exactly_one_report(site: int) -> None:
    for url in (f"http://127.0.0.1:{site}/page", "http://[::1]/", "ftp://x/"):
        out = run_module(url, env_for(site))
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == 1
        Report.model_validate_json(lines[0])


def test_module_usage_error_still_prints_a_report() -> None:
    out = subprocess.run([sys.executable, "-m", "safeurl_worker.fetcher"], capture_output=True,
                         text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 2
    assert Report.model_validate_json(out.stdout).error is not None


@pytest.mark.parametrize("path", ["/gzip", "/deflate", "/raw-deflate"])
def test_content_encoding_is_decoded(site: int, path: str) -> None:
    report = scan(f"http://127.0.0.1:{site}{path}", env_for(site))
    f = report["features"]
    assert (report["title"], f["parse"]) == ("Sign in", "full")
    assert f["forms"][0]["has_password"] and f["forms"][0]["has_email"]
    assert report["body_size"] == len(EXTRA[path][2])  # the bytes on the wire


def test_gzip_bomb_is_cut_at_the_cap_with_a_reason(site: int) -> None:
    report = scan(f"http://127.0.0.1:{site}/bomb", env_for(site, FETCH_MAX_BYTES=str(MIB)))
    f = report["features"]
    assert report["error"] is None and report["title"] == "bomb"
    assert report["body_size"] == len(BOMB) < MIB  # what was read; 8 MiB when decoded
    assert f["parse"] == "partial"
    assert f"more than {MIB} bytes" in f["parse_problem"]


def test_unsupported_content_encoding_is_said(site: int) -> None:
    f = scan(f"http://127.0.0.1:{site}/br", env_for(site))["features"]
    assert f["parse"] == "none" and "'br' is not supported" in f["parse_problem"]


def test_refresh_header_is_followed_like_a_meta_refresh(site: int) -> None:
    report = scan(f"http://127.0.0.1:{site}/refresh-header", env_for(site))
    base = f"http://127.0.0.1:{site}"
    assert [(h["url"], h["location"], h["kind"]) for h in report["redirects"]] == [
        (f"{base}/refresh-header", f"{base}/page", "meta")]
    assert report["final_url"] == f"{base}/page" and report["title"] == "Welcome home"


def test_missing_content_type_is_sniffed(site: int) -> None:
    sniffed = scan(f"http://127.0.0.1:{site}/sniff", env_for(site))["features"]
    assert sniffed["parse"] == "full" and sniffed["forms"][0]["has_password"]
    plain = scan(f"http://127.0.0.1:{site}/text-plain", env_for(site))["features"]
    assert plain["parse"] == "none" and plain["forms"] == []  # text/plain is never HTML


def test_unknown_charset_label_falls_back_not_fails(site: int) -> None:
    report = scan(f"http://127.0.0.1:{site}/latin1", env_for(site))
    assert report["error"] is None
    assert report["title"] == "Caf\u00e9"  # not UTF-8, so windows-1252, as a browser does


def test_user_agent_is_configurable(site: int) -> None:
    scan(f"http://127.0.0.1:{site}/page", env_for(site, FETCH_USER_AGENT="Agent/9\r\nX: y"))
    assert Handler.seen[0]["user-agent"] == "Agent/9  X: y"  # no header injection


def test_refused_name_does_not_leak_its_internal_address() -> None:
    def internal(host: str, port: int) -> list[str]:
        return ["10.20.30.40", "fd00::5"]

    report = scan("http://intranet.example/", {}, resolver=internal)
    assert report["error"]["code"] == "BLOCKED_TARGET"
    text = json.dumps(report)
    assert "10.20.30.40" not in text and "fd00::5" not in text, text
    assert "intranet.example" in report["error"]["message"]
    assert report["resolved_addresses"] == []
    literal = scan("http://10.20.30.40/", {})  # given by the submitter: nothing to hide
    assert "10.20.30.40" in literal["error"]["message"]


def test_redirect_urls_are_truncated(site: int) -> None:
    report = scan(f"http://127.0.0.1:{site}/long-redirect", env_for(site))
    hop = report["redirects"][0]
    assert len(hop["location"]) == 8192  # percent-encoded by the URL parser, then cut


def test_location_is_read_as_utf8_like_a_browser(site: int) -> None:
    report = scan(f"http://127.0.0.1:{site}/utf8-redirect", env_for(site))
    assert report["redirects"][0]["location"] == f"http://127.0.0.1:{site}/caf%C3%A9"


@pytest.mark.parametrize("cap", [1024 * 1024, 64 * 1024])
def test_hostile_page_report_fits_the_stdout_cap(site: int, cap: int) -> None:
    out = subprocess.run(
        [sys.executable, "-s", "-m", "safeurl_worker.fetcher",
         f"http://127.0.0.1:{site}/hostile"],
        capture_output=True, timeout=60, cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env_for(site, FETCH_MAX_OUTPUT_BYTES=str(cap))})
    assert out.returncode == 0, out.stderr
    assert len(out.stdout) <= cap
    report = Report.model_validate_json(out.stdout)
    assert report.error is None and report.features.parse == "full"
    assert report.truncated, "something had to be left out, and it is counted"
    assert report.features.forms and report.features.images  # not everything was dropped
    # Without the fitting the same report would be far over the cap:
    unfitted = fetch.run(f"http://127.0.0.1:{site}/hostile",
                         env_for(site, FETCH_MAX_OUTPUT_BYTES=str(1 << 30)))
    assert len(json.dumps(unfitted, ensure_ascii=False).encode()) > 1024 * 1024
