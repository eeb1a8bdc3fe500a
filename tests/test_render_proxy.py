"""The browser sandbox's egress proxy (safeurl_worker/render/proxy.py) against local servers on
127.0.0.1: what it forwards, what it refuses (and that a refused target sees no connection),
tunnels, the per-render DNS cache; plus the report's pure helpers."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import struct
import zlib
from collections.abc import AsyncIterator, Sequence

import mmh3
import pytest

from safeurl_worker.render import browse, report
from safeurl_worker.render.proxy import EgressProxy, ProxyConfig, certificate_summary

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


class Origin:
    """A tiny HTTP server that records every connection and request head it receives."""

    def __init__(self) -> None:
        self.connections = 0
        self.heads: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        body = b"hello from origin"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        writer.close()

    def close(self) -> None:
        assert self._server is not None
        self._server.close()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    server = Origin()
    await server.start()
    yield server
    server.close()


def resolver_to(address: str, calls: list[str]) -> browse.netcheck.Resolver:
    def resolve(host: str, port: int) -> Sequence[str]:
        calls.append(host)
        return [address]
    return resolve


async def through(proxy: EgressProxy, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def make_proxy(origin: Origin, allow: tuple[ipaddress.IPv4Network, ...],
                     calls: list[str]) -> EgressProxy:
    proxy = EgressProxy(ProxyConfig(frozenset({origin.port}), allow),
                        resolver=resolver_to("127.0.0.1", calls))
    await proxy.start()
    return proxy


async def test_allowed_request_is_forwarded_in_origin_form(origin: Origin) -> None:
    calls: list[str] = []
    proxy = await make_proxy(origin, LOOPBACK, calls)
    try:
        url = f"http://site.test:{origin.port}"
        for path in ("/a?x=1", "/b"):
            answer = await through(proxy, f"GET {url}{path} HTTP/1.1\r\nHost: site.test\r\n"
                                          "Proxy-Connection: keep-alive\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello from origin")
    finally:
        await proxy.close()
    assert [h.split(b"\r\n")[0] for h in origin.heads] == [b"GET /a?x=1 HTTP/1.1",
                                                           b"GET /b HTTP/1.1"]
    assert all(b"Proxy-Connection" not in h and b"Connection: close" in h for h in origin.heads)
    assert calls == ["site.test"]  # resolved once for the whole render
    assert proxy.refused == [] and proxy.addresses() == ["127.0.0.1"]
    assert proxy.address_of("site.test", origin.port) == "127.0.0.1"


async def test_refused_request_is_recorded_and_never_sent(origin: Origin) -> None:
    proxy = await make_proxy(origin, (), [])
    try:
        answer = await through(proxy, f"GET http://inside.test:{origin.port}/secret HTTP/1.1\r\n"
                                      "Host: inside.test\r\n\r\n".encode())
        tunnel = await through(proxy, f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n"
                                      .encode())
        wrong_port = await through(proxy, b"CONNECT inside.test:25 HTTP/1.1\r\n\r\n")
    finally:
        await proxy.close()
    assert answer.startswith(b"HTTP/1.1 403") and tunnel.startswith(b"HTTP/1.1 403")
    assert wrong_port.startswith(b"HTTP/1.1 403")
    assert origin.connections == 0
    urls = [(r.url, r.method, r.code) for r in proxy.refused]
    assert urls == [(f"http://inside.test:{origin.port}/secret", "GET", "BLOCKED_TARGET"),
                    (f"127.0.0.1:{origin.port}", "CONNECT", "BLOCKED_TARGET"),
                    ("inside.test:25", "CONNECT", "BLOCKED_TARGET")]
    # A name's internal address is redacted; a literal is named as given.
    assert "<address> is loopback" in proxy.refused[0].reason
    assert "127.0.0.1 is loopback" in proxy.refused[1].reason
    assert "port 25 is not in the allowed ports" in proxy.refused[2].reason
    assert proxy.refusal_for(f"http://inside.test:{origin.port}/secret") is proxy.refused[0]
    assert proxy.refusal_for(f"ws://127.0.0.1:{origin.port}/socket") is proxy.refused[1]


async def test_allowed_tunnel_relays_bytes(origin: Origin) -> None:
    proxy = await make_proxy(origin, LOOPBACK, [])
    try:
        answer = await through(proxy, f"CONNECT site.test:{origin.port} HTTP/1.1\r\n\r\n"
                                      "GET /in-tunnel HTTP/1.1\r\nHost: site.test\r\n\r\n"
                                      .encode())
    finally:
        await proxy.close()
    assert answer.startswith(b"HTTP/1.1 200 Connection Established\r\n\r\nHTTP/1.1 200 OK")
    assert origin.heads[0].startswith(b"GET /in-tunnel HTTP/1.1")
    assert proxy.exchanges[0].bytes_in > 0


async def test_unanswered_lookup_is_bounded() -> None:
    def never(host: str, port: int) -> Sequence[str]:
        import time
        time.sleep(3)
        return ["127.0.0.1"]

    proxy = EgressProxy(ProxyConfig(frozenset({80}), LOOPBACK, dns_timeout_s=0.3),
                        resolver=never)
    check = await asyncio.wait_for(proxy.check("http://slow.test/"), 2)
    assert not check.ok and check.code == "DNS_FAILED"


def test_favicon_hash_matches_shodans_formula() -> None:
    icon = b"\x00\x01" * 300  # long enough that encodebytes inserts newlines
    assert browse.favicon_hash(icon) == mmh3.hash(base64.encodebytes(icon))
    assert b"\n" in base64.encodebytes(icon)[:-1]


def test_image_size_reads_png_and_jpeg_headers() -> None:
    ihdr = struct.pack(">II", 640, 480) + b"\x08\x02\x00\x00\x00"
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr \
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    assert report.image_size(png) == (640, 480)
    jpeg = (b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 4) + b"\x00\x00"
            + b"\xff\xc0" + struct.pack(">HBHH", 11, 8, 300, 200) + b"\x00" * 6)
    assert report.image_size(jpeg) == (200, 300)
    assert report.image_size(b"not an image") == (None, None)


def test_certificate_summary() -> None:
    cert = {"subject": ((("commonName", "shop.example"),),),
            "issuer": ((("organizationName", "Test CA"),), (("commonName", "Test CA R1"),)),
            "subjectAltName": (("DNS", "shop.example"), ("DNS", "*.shop.example"),
                               ("email", "x@y")),
            "notBefore": "Jan  1 00:00:00 2026 GMT", "notAfter": "Apr  1 00:00:00 2026 GMT",
            "serialNumber": "0A"}
    now = 1767225600 + 10 * 86400  # 2026-01-11
    summary = certificate_summary(cert, "TLSv1.3", now)
    assert summary == {"subject": "commonName=shop.example",
                       "issuer": "organizationName=Test CA, commonName=Test CA R1",
                       "sans": ["shop.example", "*.shop.example"],
                       "not_before": "Jan  1 00:00:00 2026 GMT",
                       "not_after": "Apr  1 00:00:00 2026 GMT", "age_days": 10.0,
                       "serial": "0A", "version": "TLSv1.3"}
