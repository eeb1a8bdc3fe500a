"""Fetch one URL safely and build the report (a dict matching safeurl_worker.models.Report).

Every hop (the first URL, each HTTP redirect, each meta refresh) goes through `netcheck.check_url`
and is then fetched from the checked addresses only. One overall deadline bounds DNS, connect and
read of all hops: a watchdog shuts the socket down when it passes, so even a target that drips one
byte a second ends in a READ_TIMEOUT report instead of a killed container.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import ipaddress
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import content, htmlscan, netcheck, reportfit

FETCHER_VERSION = "1.1.0"
# What a visitor's browser sends: a scanner that announces itself is trivially cloaked against.
USER_AGENT = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/142.0.0.0 Safari/537.36")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_HEADERS = 100
MAX_HEADER_VALUE = 2048
MAX_REDIRECT_HOPS = 20  # the report's bound on `redirects`
MAX_ADDRESSES = 32
CHUNK = 64 * 1024
MAX_REFRESH_DELAY_S = 10.0  # meta refreshes with a longer delay are recorded, not followed


class FetchError(Exception):
    """Ends the scan with an error code; the report keeps everything gathered so far."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message[:2048]


class HardDeadline(BaseException):
    """Raised by the last-resort alarm in __main__; BaseException so no handler swallows it."""


@dataclass(frozen=True)
class FetchConfig:
    allowed_ports: frozenset[int] = frozenset({80, 443})
    allow_cidrs: tuple[netcheck.IPNetwork, ...] = ()
    max_redirects: int = 5
    max_bytes: int = 2 * 1024 * 1024
    timeout_s: float = 20.0
    user_agent: str = USER_AGENT
    max_output: int = reportfit.DEFAULT_MAX_OUTPUT  # the worker's stdout cap

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FetchConfig:
        """Read FETCH_* variables; raises ValueError naming the bad variable."""
        def get(name: str, default: str) -> str:
            return env.get(name, "").strip() or default

        try:
            ports = frozenset(int(p) for p in get("FETCH_ALLOWED_PORTS", "80,443").split(",")
                              if p.strip())
            cfg = cls(
                allowed_ports=ports,
                allow_cidrs=tuple(netcheck.parse_cidrs(env.get("FETCH_ALLOW_CIDRS", ""))),
                max_redirects=min(int(get("FETCH_MAX_REDIRECTS", "5")), MAX_REDIRECT_HOPS),
                max_bytes=int(get("FETCH_MAX_BYTES", str(2 * 1024 * 1024))),
                timeout_s=float(get("FETCH_TIMEOUT_S", "20")),
                user_agent=_header_safe(get("FETCH_USER_AGENT", USER_AGENT)),
                max_output=int(get("FETCH_MAX_OUTPUT_BYTES", str(reportfit.DEFAULT_MAX_OUTPUT))),
            )
        except ValueError as exc:
            raise ValueError(f"invalid FETCH_* configuration: {exc}") from None
        if (cfg.max_redirects < 0 or cfg.max_bytes < 1 or not cfg.timeout_s > 0
                or cfg.max_output < reportfit.MIN_OUTPUT):
            raise ValueError("invalid FETCH_* configuration: values must be positive")
        return cfg


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()


@dataclass
class Response:
    url: netcheck.ParsedUrl
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    truncated: bool = False
    error: FetchError | None = None  # set when the body read failed part-way

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass
class _Watchdog:
    """Shuts the socket down at the deadline so that any blocked read returns at once."""

    deadline: Deadline
    sock: socket.socket | None = None
    fired: bool = False
    _timer: threading.Timer | None = field(default=None, repr=False)

    def start(self, sock: socket.socket) -> None:
        self.sock = sock
        self._timer = threading.Timer(max(0.0, self.deadline.remaining()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        if self.sock is not None:
            # The base-class shutdown works on the fd, also under an SSLSocket.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def timed_resolver(deadline: Deadline) -> netcheck.Resolver:
    """getaddrinfo has no timeout: run it in a daemon thread and stop waiting at the deadline."""

    def resolve(host: str, port: int) -> list[str]:
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["v"] = netcheck.system_resolver(host, port)
            except Exception as exc:  # handed over to the caller's thread
                box["e"] = exc

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        thread.join(max(0.0, deadline.remaining()))
        if thread.is_alive():
            raise TimeoutError("DNS lookup timed out")
        if "e" in box:
            raise box["e"]
        result: list[str] = box["v"]
        return result

    return resolve


class Fetcher:
    """One scan: follows the redirect chain and accumulates the report."""

    def __init__(self, url: str, cfg: FetchConfig,
                 resolver: netcheck.Resolver | None = None) -> None:
        self.cfg = cfg
        self.started = time.monotonic()
        self.deadline = Deadline(cfg.timeout_s)
        self.resolver = resolver or timed_resolver(self.deadline)
        self.requested_url = url
        self.redirects: list[dict[str, Any]] = []
        self.addresses: list[str] = []
        self.connected: str | None = None
        self.tls: dict[str, Any] | None = None
        self.response: Response | None = None
        self.page: htmlscan.PageFeatures | None = None
        self.dns_ms: float | None = None
        self.connect_ms: float | None = None
        self.error: dict[str, str] | None = None

    # --- the chain ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Never raises for a target's behaviour; a bug becomes INTERNAL_ERROR."""
        try:
            self._follow()
        except FetchError as exc:
            self._fail(exc.code, exc.message)
        except HardDeadline:
            self._fail("READ_TIMEOUT", "hard deadline reached")
        except Exception as exc:
            print(f"fetcher: internal error: {exc!r}", file=sys.stderr)
            self._fail("INTERNAL_ERROR", f"{type(exc).__name__}: {exc}")
        return self.report()

    def _follow(self) -> None:
        url = self.requested_url
        while True:
            if self.deadline.remaining() <= 0:
                raise FetchError("READ_TIMEOUT", "deadline reached before the next hop")
            check = self._check(url)
            assert check.url is not None
            resp = self._fetch_one(check.url, check.addresses)
            self.response, self.page = resp, None
            nxt = self._next_hop(resp)
            if resp.error is not None:  # features of the partial body are kept above
                raise resp.error
            if nxt is None:
                return
            self.redirects.append(nxt)
            if len(self.redirects) > self.cfg.max_redirects:
                raise FetchError("TOO_MANY_REDIRECTS",
                                 f"more than {self.cfg.max_redirects} redirects")
            url = str(nxt["location"])

    def _check(self, url: str) -> netcheck.CheckResult:
        check = netcheck.check_url(url, self.cfg.allowed_ports, self.cfg.allow_cidrs,
                                   resolver=self.resolver, clock=time.monotonic)
        if check.dns_ms is not None:
            self.dns_ms = (self.dns_ms or 0.0) + check.dns_ms
        if not check.ok:
            raise FetchError(check.code or "BLOCKED_TARGET", _redacted(check))
        for addr in check.addresses:  # only addresses we were allowed to connect to
            if addr not in self.addresses:
                self.addresses.append(addr)
        return check

    def _next_hop(self, resp: Response) -> dict[str, Any] | None:
        here = resp.url.serialize()
        location = _utf8_header(resp.header("location"))
        if resp.status in REDIRECT_STATUSES and location:
            target = htmlscan.resolve(here, location)
            return {"url": here, "status": resp.status, "location": target, "kind": "http"}
        self.page = self._scan(resp, here)
        refresh = self.page.meta_refresh if self.page is not None else None
        # A page that refreshes itself (news tickers) is not a redirect, and neither is a long
        # delay (session timeouts): only what a visitor would land on at once is followed.
        if refresh is None or refresh.split("#", 1)[0] == here.split("#", 1)[0]:
            return None
        assert self.page is not None
        if self.page.meta_refresh_delay > MAX_REFRESH_DELAY_S:
            return None
        return {"url": here, "status": None, "location": refresh, "kind": "meta"}

    def _scan(self, resp: Response, here: str) -> htmlscan.PageFeatures | None:
        """The page's features (None for a body that is not HTML and has no Refresh header)."""
        decoded = content.decode_content(resp.body, resp.header("content-encoding"),
                                         self.cfg.max_bytes)
        ctype = resp.header("content-type")
        page: htmlscan.PageFeatures | None = None
        if not decoded.decoded:
            page = htmlscan.PageFeatures(scripts=htmlscan.script_stats([], 0),
                                         parse_problem=decoded.problem)
        elif content.is_html(ctype, decoded.body):
            text, page_encoding = content.decode_html(decoded.body, ctype)
            page = htmlscan.scan_html(text, here, self._parse_budget())
            page.encoding = page_encoding
            for problem in (decoded.problem, self._body_problem(resp)):
                if problem:
                    page.mark_partial(problem)
        refresh = htmlscan.parse_refresh(_utf8_header(resp.header("refresh")) or "")
        if refresh is not None and refresh[1] is not None:
            # The Refresh header acts before the document's own <meta> refresh does.
            page = page or htmlscan.PageFeatures(scripts=htmlscan.script_stats([], 0))
            page.meta_refresh = htmlscan.resolve(here, refresh[1])
            page.meta_refresh_delay = refresh[0]
        return page

    def _parse_budget(self) -> float:
        """Parsing gets what is left of the deadline (at least 1 s, at most PARSE_BUDGET_S):
        the __main__ alarm leaves 2 s past the deadline, so a late body is still scanned."""
        return max(1.0, min(htmlscan.PARSE_BUDGET_S, self.deadline.remaining() - 0.5))

    def _body_problem(self, resp: Response) -> str | None:
        if resp.truncated:
            return f"body over {self.cfg.max_bytes} bytes; the first {self.cfg.max_bytes} were read"
        if resp.error is not None:
            return f"body cut short ({resp.error.code}); what arrived was parsed"
        return None

    def _fail(self, code: str, message: str) -> None:
        self.error = {"code": code, "message": message[:2048]}

    # --- one hop --------------------------------------------------------------------------

    def _fetch_one(self, url: netcheck.ParsedUrl, addresses: list[str]) -> Response:
        sock = self._connect(url, addresses)
        dog = _Watchdog(self.deadline)
        dog.start(sock)
        try:
            if url.scheme == "https":
                sock = self._handshake(sock, url, dog)
            return self._exchange(sock, url, dog)
        finally:
            dog.cancel()
            sock.close()

    def _connect(self, url: netcheck.ParsedUrl, addresses: list[str]) -> socket.socket:
        """Connect to the checked addresses in order; never resolves anything again."""
        last: FetchError | None = None
        start = time.monotonic()
        for addr in addresses:
            remaining = self.deadline.remaining()
            if remaining <= 0:
                last = FetchError("CONNECT_TIMEOUT", f"deadline reached connecting to {addr}")
                break
            ip = ipaddress.ip_address(addr)
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(remaining)
            try:
                sock.connect((addr, url.port))
            except TimeoutError:
                sock.close()
                last = FetchError("CONNECT_TIMEOUT", f"connect to {addr}:{url.port} timed out")
                continue
            except OSError as exc:
                sock.close()
                last = FetchError("CONNECT_FAILED", f"connect to {addr}:{url.port}: {exc}")
                continue
            self.connected = addr
            self.connect_ms = (self.connect_ms or 0.0) + (time.monotonic() - start) * 1000
            return sock
        raise last or FetchError("CONNECT_FAILED", "no address to connect to")

    def _handshake(self, sock: socket.socket, url: netcheck.ParsedUrl,
                   dog: _Watchdog) -> socket.socket:
        ctx = ssl.create_default_context()  # verifies the chain and the name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            tls = ctx.wrap_socket(sock, server_hostname=url.host)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            if dog.fired:
                raise FetchError("CONNECT_TIMEOUT", "deadline reached in TLS handshake") from None
            message = getattr(exc, "verify_message", None) or str(exc)
            self.tls = {"verified": False, "version": None, "error": str(message)[:2048]}
            raise FetchError("TLS_ERROR", f"TLS with {url.host}: {message}") from None
        except OSError as exc:
            if dog.fired or isinstance(exc, TimeoutError):
                raise FetchError("CONNECT_TIMEOUT", "TLS handshake timed out") from None
            self.tls = {"verified": False, "version": None, "error": str(exc)[:2048]}
            raise FetchError("TLS_ERROR", f"TLS with {url.host}: {exc}") from None
        dog.sock = tls
        self.tls = {"verified": True, "version": (tls.version() or "")[:32] or None,
                    "error": None}
        return tls

    def _exchange(self, sock: socket.socket, url: netcheck.ParsedUrl,
                  dog: _Watchdog) -> Response:
        """Send the request and read status, headers and the capped body."""
        conn = http.client.HTTPConnection(url.host, url.port)
        conn.sock = sock  # already connected to the checked address: http.client never resolves
        try:
            self._send(conn, sock, url)
            raw = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise self._read_error(exc, dog, "reading the response head") from None
        if dog.fired:  # the head was cut off by the watchdog: do not trust what was parsed
            raise FetchError("READ_TIMEOUT", "deadline reached while reading the response head")
        if not 100 <= raw.status <= 599:
            raise FetchError("PROTOCOL_ERROR", f"invalid HTTP status {raw.status}")
        resp = Response(url, raw.status, raw.getheaders())
        self._read_body(raw, sock, resp, dog)
        return resp

    def _send(self, conn: http.client.HTTPConnection, sock: socket.socket,
              url: netcheck.ParsedUrl) -> None:
        sock.settimeout(max(0.01, self.deadline.remaining()))
        conn.putrequest("GET", url.path, skip_host=True, skip_accept_encoding=True)
        for name, value in (("Host", url.host_header), ("User-Agent", self.cfg.user_agent),
                            ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,"
                                       "*/*;q=0.8"),
                            ("Accept-Language", "en-US,en;q=0.9"),
                            ("Accept-Encoding", content.ACCEPT_ENCODING),
                            ("Connection", "close")):
            conn.putheader(name, value)
        conn.endheaders()

    def _read_body(self, raw: http.client.HTTPResponse, sock: socket.socket, resp: Response,
                   dog: _Watchdog) -> None:
        parts: list[bytes] = []
        size, cap = 0, self.cfg.max_bytes
        try:
            while size < cap:
                sock.settimeout(max(0.01, self.deadline.remaining()))
                chunk = raw.read1(min(CHUNK, cap - size))
                if not chunk or dog.fired:
                    break
                parts.append(chunk)
                size += len(chunk)
            if dog.fired:
                raise TimeoutError
            resp.truncated = size >= cap and self._more_data(raw, sock)
        except (OSError, http.client.HTTPException) as exc:
            resp.error = self._read_error(exc, dog, "reading the body")
        resp.body = b"".join(parts)

    def _more_data(self, raw: http.client.HTTPResponse, sock: socket.socket) -> bool:
        """After the cap: is there more? Known lengths answer at once; otherwise peek 1 byte."""
        if raw.length is not None:
            return raw.length > 0
        sock.settimeout(max(0.01, min(1.0, self.deadline.remaining())))
        try:
            return bool(raw.read1(1))
        except (OSError, http.client.HTTPException):
            return True  # cannot tell; the cap was reached, so call it truncated

    def _read_error(self, exc: BaseException, dog: _Watchdog, what: str) -> FetchError:
        if dog.fired or isinstance(exc, TimeoutError):
            return FetchError("READ_TIMEOUT", f"deadline reached while {what}")
        if isinstance(exc, ssl.SSLError):
            return FetchError("TLS_ERROR", f"TLS error while {what}: {exc}")
        return FetchError("PROTOCOL_ERROR", f"{type(exc).__name__} while {what}: {exc}")

    # --- the report -----------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        resp = self.response
        report: dict[str, Any] = {
            "schema_version": 1,
            "fetcher_version": FETCHER_VERSION,
            "requested_url": self.requested_url[: netcheck.MAX_URL],
            "final_url": resp.url.serialize()[: netcheck.MAX_URL] if resp else None,
            "redirects": [_bounded_hop(h) for h in self.redirects[:MAX_REDIRECT_HOPS]],
            "resolved_addresses": [a[:64] for a in self.addresses[:MAX_ADDRESSES]],
            "connected_address": self.connected[:64] if self.connected else None,
            "tls": self.tls,
            "features": self.page.features() if self.page else htmlscan.empty_features(),
            "timings": {"dns_ms": _ms(self.dns_ms), "connect_ms": _ms(self.connect_ms),
                        "total_ms": _ms(time.monotonic() - self.started, 1000) or 0.0},
            "error": self.error,
        }
        report.update(_response_fields(resp))
        truncated: dict[str, int] = {}
        if len(self.redirects) > MAX_REDIRECT_HOPS:
            truncated["redirects"] = len(self.redirects) - MAX_REDIRECT_HOPS
        if resp is not None and len(report["headers"]) < len({k.lower() for k, _ in resp.headers}):
            truncated["headers"] = len({k.lower() for k, _ in resp.headers}) - MAX_HEADERS
        if self.page is not None:
            report["title"] = self.page.title
            truncated.update(self.page.dropped)
        report["truncated"] = truncated
        cleaned: dict[str, Any] = reportfit.fit(clean(report), self.cfg.max_output)
        return cleaned


def _header_safe(value: str) -> str:
    """A header value cannot carry CR, LF or NUL (http.client would refuse to send it)."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", value)[:512]


def _utf8_header(value: str | None) -> str | None:
    """http.client decodes header bytes as Latin-1; a browser reads a URL in `Location` or
    `Refresh` as UTF-8 (`/caf\u00c3\u00a9` on the wire is `/caf\u00e9`)."""
    if value is None or value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _bounded_hop(hop: dict[str, Any]) -> dict[str, Any]:
    return {**hop, "url": str(hop["url"])[: netcheck.MAX_URL],
            "location": str(hop["location"])[: netcheck.MAX_URL]}


_ADDRESS_TOKEN = re.compile(r"[0-9A-Za-z:.%]+")


def _redacted(check: netcheck.CheckResult) -> str:
    """The refusal, without the internal addresses a name resolved to: the message is stored
    with the result, and which internal address a public name points at is the operator's
    secret, not the submitter's. A literal address in the URL is already in the report."""
    if check.url is None or check.url.ip is not None or not check.blocked:
        return check.reason

    def hide(m: re.Match[str]) -> str:
        token = m.group(0)
        if m.string[m.end():m.end() + 1] == "/":
            return token  # a network such as 10.0.0.0/8 says which rule, not which host
        try:
            ipaddress.ip_address(token.split("%", 1)[0])
        except ValueError:
            return token
        return "<address>"

    return _ADDRESS_TOKEN.sub(hide, check.reason)


def _ms(value: float | None, scale: float = 1.0) -> float | None:
    return None if value is None else round(max(0.0, value * scale), 3)


def _response_fields(resp: Response | None) -> dict[str, Any]:
    if resp is None:
        return {"http_status": None, "headers": {}, "content_type": None, "body_size": 0,
                "body_truncated": False, "sha256": None, "title": None}
    headers: dict[str, str] = {}
    for name, value in resp.headers:
        key = name.lower()[:128]
        if key in headers:  # repeated headers (set-cookie) are joined like http.client does
            headers[key] = f"{headers[key]}, {value}"[:MAX_HEADER_VALUE]
        elif len(headers) < MAX_HEADERS:
            headers[key] = value[:MAX_HEADER_VALUE]
    ctype = resp.header("content-type")
    return {"http_status": resp.status, "headers": headers,
            "content_type": ctype[:256] if ctype is not None else None,
            "body_size": len(resp.body), "body_truncated": resp.truncated,
            "sha256": hashlib.sha256(resp.body).hexdigest(), "title": None}


def clean(value: Any) -> Any:
    """Replace lone surrogates (from hostile headers or markup) so the JSON is valid UTF-8."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {clean(k): clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def error_report(url: str, code: str, message: str) -> dict[str, Any]:
    """A report for a scan that could not even start (bad arguments or configuration)."""
    fetcher = Fetcher(url, FetchConfig())
    fetcher._fail(code, message)
    return fetcher.report()


def run(url: str, env: Mapping[str, str],
        resolver: netcheck.Resolver | None = None) -> dict[str, Any]:
    """Scan `url` with FETCH_* settings from `env`; always returns a report dict."""
    try:
        cfg = FetchConfig.from_env(env)
    except ValueError as exc:
        return error_report(url, "INTERNAL_ERROR", str(exc))
    return Fetcher(url, cfg, resolver).run()
