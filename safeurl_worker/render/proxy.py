"""The egress proxy inside the browser sandbox: every byte Chromium sends goes through here.

Chromium is started with `--proxy-server` pointing at this proxy and with host resolver rules
that make every name unresolvable, so the browser cannot reach anything by itself: it hands the
proxy a name (absolute-URI `GET http://host/...` for plain HTTP, `CONNECT host:port` for HTTPS and
for every WebSocket), and the proxy applies the fetcher's own rules (`netcheck.check_url`): parse
like a browser, allowed ports, resolve once, every address checked, connect to a checked address
only. Each request, redirect hop, sub-resource and WebSocket is a new request to the proxy, so
each is checked. A refused one is answered 403 and recorded (`refused`); nothing is sent to it.

A name is resolved once per render (the answer is cached), so a page cannot rebind a name
between two of its own requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..fetcher import fetch, netcheck

MAX_HEAD = 64 * 1024  # request line + headers from Chromium
MAX_RECORDS = 500
CHUNK = 64 * 1024
HOP_HEADERS = frozenset({"proxy-connection", "proxy-authorization", "connection", "keep-alive",
                         "te", "trailer", "upgrade"})


@dataclass
class Refusal:
    url: str  # absolute URL for plain HTTP, `host:port` for a tunnel (HTTPS or WebSocket)
    method: str
    code: str  # BLOCKED_TARGET, DNS_FAILED, INVALID_URL, CONNECT_FAILED, ...
    reason: str
    at_ms: float

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url[:netcheck.MAX_URL], "method": self.method[:16],
                "code": self.code, "reason": self.reason[:1024], "at_ms": self.at_ms}


@dataclass
class Exchange:
    """One connection the proxy made for the browser."""

    target: str  # absolute URL (HTTP) or host:port (tunnel)
    method: str
    address: str
    port: int
    bytes_in: int = 0  # from the target to the browser
    bytes_out: int = 0


@dataclass
class ProxyConfig:
    allowed_ports: frozenset[int]
    allow_cidrs: tuple[netcheck.IPNetwork, ...]
    connect_timeout_s: float = 10.0
    dns_timeout_s: float = 5.0
    max_total_bytes: int = 64 * 1024 * 1024  # everything the page may download, all requests


@dataclass
class EgressProxy:
    cfg: ProxyConfig
    resolver: netcheck.Resolver = netcheck.system_resolver
    clock: Callable[[], float] = time.monotonic
    refused: list[Refusal] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)
    dropped: int = 0  # records over MAX_RECORDS
    dns_ms: float = 0.0
    connect_ms: float = 0.0
    total_in: int = 0
    port: int = 0
    _checks: dict[tuple[str, int], netcheck.CheckResult] = field(default_factory=dict)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _started: float = field(default_factory=time.monotonic)

    async def start(self) -> int:
        """Listen on 127.0.0.1 (an ephemeral port); returns the port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0,
                                                  limit=MAX_HEAD)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)

    def addresses(self) -> list[str]:
        """Every address a checked, allowed name resolved to (in order, once)."""
        seen: dict[str, None] = {}
        for check in self._checks.values():
            if check.ok:
                seen.update(dict.fromkeys(check.addresses))
        return list(seen)

    def address_of(self, host: str, port: int) -> str | None:
        """The address the last connection to host:port went to."""
        for ex in reversed(self.exchanges):
            if ex.port == port and _host_of(ex.target) == host:
                return ex.address
        return None

    def refusal_for(self, url: str) -> Refusal | None:
        """The refusal that stopped `url` (by URL for HTTP, by host:port for a tunnel)."""
        scheme, sep, rest = url.partition(":")
        web = {"ws": "http", "wss": "https"}.get(scheme.lower())  # WebSockets are tunnelled
        try:
            parsed = netcheck.parse_url(f"{web}{sep}{rest}" if web else url)
        except netcheck.UrlError:
            return None
        authority = f"{parsed.host_header.rsplit(':', 1)[0]}:{parsed.port}"
        for ref in reversed(self.refused):
            if ref.url in (parsed.serialize(), url, authority):
                return ref
        return None

    # --- one client connection -------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # the browser or the target hung up; nothing to record
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers = [(name, value) for name, sep, value in (h.partition(":") for h in lines[1:])
                   if sep]
        if method == "CONNECT":
            await self._tunnel(target, reader, writer)
        else:
            await self._forward(method, target, headers, reader, writer)

    async def check(self, url: str) -> netcheck.CheckResult:
        """The check of the URL the user submitted, before the browser starts (cached too)."""
        result = await self._check(url, "GET", url)
        if result is not None:
            return result
        ref = self.refused[-1]
        return netcheck.CheckResult(False, None, [], ref.reason, ref.code)

    async def _check(self, url: str, method: str, record_as: str) -> netcheck.CheckResult | None:
        """The fetcher's check, its DNS answer cached per (host, port); None when refused."""
        try:
            parsed = netcheck.parse_url(url)
            key: tuple[str, int] | None = (parsed.host, parsed.port)
        except netcheck.UrlError:
            key = None
        check = self._checks.get(key) if key else None
        if check is None:
            start = self.clock()
            check = await self._check_in_thread(url)
            self.dns_ms += (self.clock() - start) * 1000
            if key is not None and check.code != netcheck.INVALID_URL:
                self._checks[key] = check
        if check.ok:
            return check
        self._refuse(record_as, method, check.code or netcheck.BLOCKED_TARGET,
                     fetch._redacted(check))
        return None

    async def _check_in_thread(self, url: str) -> netcheck.CheckResult:
        """check_url with its lookup bounded: getaddrinfo has no timeout, so it runs in a daemon
        thread that is abandoned (not waited for at exit) when the lookup takes too long."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[netcheck.CheckResult] = loop.create_future()

        def deliver(result: netcheck.CheckResult) -> None:
            if not done.done():
                done.set_result(result)

        def work() -> None:
            result = netcheck.check_url(url, self.cfg.allowed_ports, self.cfg.allow_cidrs,
                                        self.resolver)
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                loop.call_soon_threadsafe(deliver, result)

        threading.Thread(target=work, daemon=True).start()
        try:
            return await asyncio.wait_for(done, self.cfg.dns_timeout_s)
        except TimeoutError:
            host = url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
            return netcheck.CheckResult(False, host, [], f"cannot resolve {host}: timed out",
                                        netcheck.DNS_FAILED)

    def _refuse(self, url: str, method: str, code: str, reason: str) -> None:
        if len(self.refused) >= MAX_RECORDS:
            self.dropped += 1
            return
        at = round((self.clock() - self._started) * 1000, 1)
        self.refused.append(Refusal(url, method, code, reason, at))

    async def _connect(self, check: netcheck.CheckResult, port: int, target: str, method: str
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Exchange] | None:
        """Connect to the checked addresses in order (never a new lookup)."""
        if self.total_in >= self.cfg.max_total_bytes:
            self._refuse(target, method, "PAGE_TOO_BIG",
                         f"the page already downloaded {self.total_in} bytes")
            return None
        start = self.clock()
        last = "no address"
        for addr in check.addresses:
            try:
                family = socket.AF_INET6 if ":" in addr else socket.AF_INET
                r, w = await asyncio.wait_for(
                    asyncio.open_connection(addr, port, family=family),
                    self.cfg.connect_timeout_s)
            except (OSError, TimeoutError) as exc:
                last = f"connect to {addr}:{port}: {exc or type(exc).__name__}"
                continue
            self.connect_ms += (self.clock() - start) * 1000
            ex = Exchange(target, method, addr, port)
            if len(self.exchanges) < MAX_RECORDS:
                self.exchanges.append(ex)
            return r, w, ex
        self._refuse(target, method, "CONNECT_FAILED", last)
        return None

    async def _tunnel(self, authority: str, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """CONNECT host:port: HTTPS, and every WebSocket (Chromium tunnels ws:// too)."""
        port_text = authority.rpartition(":")[2]
        port = int(port_text) if port_text.isdigit() else 0
        scheme = "http" if port == 80 else "https"
        check = await self._check(f"{scheme}://{authority}/", "CONNECT", authority)
        conn = await self._connect(check, port, authority, "CONNECT") if check else None
        if conn is None:
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        up_r, up_w, ex = conn
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        await writer.drain()
        await self._pipe(reader, writer, up_r, up_w, ex)

    async def _forward(self, method: str, url: str, headers: Sequence[tuple[str, str]],
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """An absolute-URI request for plain HTTP: one request per connection."""
        check = await self._check(url, method, url)
        conn = None
        if check is not None:
            # This request's own URL (the cached check may be of another URL of the same host).
            parsed = netcheck.parse_url(url)
            conn = await self._connect(check, parsed.port, url, method)
        if conn is None:
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
            await writer.drain()
            return
        up_r, up_w, ex = conn
        lines = [f"{method} {parsed.path} HTTP/1.1", f"Host: {parsed.host_header}"]
        lines += [f"{k.strip()}:{v}" for k, v in headers
                  if k.strip().lower() not in HOP_HEADERS and k.strip().lower() != "host"]
        lines.append("Connection: close")  # one request per connection: each one is checked
        up_w.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await self._pipe(reader, writer, up_r, up_w, ex)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up_r: asyncio.StreamReader, up_w: asyncio.StreamWriter, ex: Exchange) -> None:
        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, inbound: bool) -> None:
            while data := await src.read(CHUNK):
                if inbound:
                    ex.bytes_in += len(data)
                    self.total_in += len(data)
                    if self.total_in > self.cfg.max_total_bytes:
                        return
                else:
                    ex.bytes_out += len(data)
                dst.write(data)
                await dst.drain()

        down = asyncio.ensure_future(copy(up_r, writer, True))
        up = asyncio.ensure_future(copy(reader, up_w, False))
        try:
            # The target closing ends the exchange; the browser closing too.
            await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
            if not down.done():
                await asyncio.wait({down}, timeout=1)
        finally:
            for task in (down, up):
                task.cancel()
            up_w.close()
            with contextlib.suppress(Exception):
                await up_w.wait_closed()

    # --- the main document's certificate ---------------------------------------------------

    async def certificate(self, host: str, port: int, timeout: float = 5.0
                          ) -> dict[str, Any] | None:
        """The certificate `host:port` presents, taken on a connection of our own to the address
        the browser was connected to (TLS 1.3 encrypts it inside the browser's tunnel)."""
        address = self.address_of(host, port)
        if address is None:
            return None
        ctx = ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            _r, w = await asyncio.wait_for(asyncio.open_connection(
                address, port, ssl=ctx, server_hostname=host), timeout)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            return {"error": str(exc)[:512]}
        try:
            cert: dict[str, Any] = w.get_extra_info("peercert") or {}
            version = w.get_extra_info("ssl_object").version()
        finally:
            w.close()
        return certificate_summary(cert, version, time.time())


def _host_of(target: str) -> str:
    if "://" in target:
        with contextlib.suppress(netcheck.UrlError):
            return netcheck.parse_url(target).host
        return ""
    host = target.rpartition(":")[0]
    return host.strip("[]")


def _names(rdns: Any) -> str:
    """('CN', 'x') tuples of a getpeercert() name, as `CN=x, O=y`."""
    return ", ".join(f"{k}={v}" for rdn in rdns or () for k, v in rdn)[:1024]


def certificate_summary(cert: dict[str, Any], version: str | None, now: float
                        ) -> dict[str, Any]:
    """What a user compares: issuer, subject, SANs, validity, and the certificate's age."""
    not_before = cert.get("notBefore")
    not_after = cert.get("notAfter")
    start = ssl.cert_time_to_seconds(not_before) if not_before else None
    return {
        "subject": _names(cert.get("subject")),
        "issuer": _names(cert.get("issuer")),
        "sans": [str(v)[:256] for k, v in cert.get("subjectAltName", ())[:100]
                 if k in ("DNS", "IP Address")],
        "not_before": not_before, "not_after": not_after,
        "age_days": None if start is None else round((now - start) / 86400, 1),
        "serial": str(cert.get("serialNumber", ""))[:128] or None,
        "version": version,
    }
