"""The SSRF address check, as a pure function: a fake resolver, and no socket is ever opened."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

import pytest

from safeurl_worker.fetcher import netcheck
from safeurl_worker.fetcher.netcheck import BLOCKED_TARGET, DNS_FAILED, INVALID_URL, check_url

PUBLIC = "93.184.216.34"
FAKE_DNS: dict[str, list[str]] = {
    "example.com": [PUBLIC],
    "metadata.google.internal": ["169.254.169.254"],
    "mixed.example": [PUBLIC, "10.0.0.5"],
    "mixed6.example": ["2606:2800:220:1:248:1893:25c8:1946", "fd00::7"],
    "mapped.example": ["::ffff:127.0.0.1"],
    "rebind.example": ["127.0.0.1"],
    "testnet.example": ["172.30.5.9"],
    "xn--bcher-kva.example": [PUBLIC],
}

# URL literals that need no DNS: refused by every fetcher, also in the image under --network none.
BLOCKED_LITERALS: list[tuple[str, str]] = [
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "127.0.0.1"),
    ("http://[::ffff:7f00:1]/", "127.0.0.1"),
    ("http://[::127.0.0.1]/", "127.0.0.1"),
    ("http://[::ffff:0:127.0.0.1]/", "127.0.0.1"),  # IPv4-translated (SIIT)
    ("http://[64:ff9b::a9fe:a9fe]/", "169.254.169.254"),
    ("http://[64:ff9b:1::a9fe:a9fe]/", "local-use NAT64"),
    ("http://[2002:a9fe:a9fe::]/", "169.254.169.254"),
    ("http://[2002:7f00:1::1]/", "127.0.0.1"),
    # Teredo: server 65.54.227.120, client 127.0.0.1 stored XOR-ed as 80ff:fffe.
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "Teredo client IPv4 127.0.0.1"),
    ("http://2130706433/", "127.0.0.1"),
    ("http://0177.0.0.1/", "127.0.0.1"),
    ("http://0x7f.1/", "127.0.0.1"),
    ("http://0x7F000001/", "127.0.0.1"),
    ("http://127.1/", "127.0.0.1"),
    ("http://127.0.1/", "127.0.0.1"),
    ("http://0x7f.0.0.0x1/", "127.0.0.1"),
    ("http://0/", "0.0.0.0"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://169.254.169.254/", "link-local"),
    ("http://0xa9.0xfe.0xa9.0xfe/", "169.254.169.254"),
    ("http://2852039166/", "169.254.169.254"),
    ("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/", "127.0.0.1"),  # fullwidth digits
    ("http://127\u30020\u30020\u30021/", "127.0.0.1"),  # ideographic full stops
    ("http://127\uff0e0\uff0e0\uff0e1/", "127.0.0.1"),  # fullwidth full stops
    ("http://127\uff610\uff610\uff611/", "127.0.0.1"),  # halfwidth ideographic full stops
    ("http://127.0.0.1./", "127.0.0.1"),
    ("http://%31%32%37.0.0.1/", "127.0.0.1"),  # percent-encoded host
    ("http://localhost/", "localhost"),
    ("http://foo.localhost/", "localhost"),
    ("http://LOCALHOST./", "localhost"),
    ("http://lo\u00adcalhost/", "localhost"),  # soft hyphen is ignored by browsers
    ("http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/", "localhost"),  # fullwidth
    ("http://10.0.0.1/", "private"),
    ("http://10.255.255.255/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://172.31.255.254/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://100.127.255.254/", "carrier-grade NAT"),
    ("http://224.0.0.1/", "multicast"),
    ("http://255.255.255.255/", "broadcast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://192.0.2.1/", "documentation"),
    ("http://198.18.0.1/", "benchmarking"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fc00::1]/", "unique local"),
    ("http://[fd00::1]/", "unique local"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[::]/", "unspecified"),
    ("http://[2001:db8::1]/", "documentation"),
    ("http://example.com@127.0.0.1/", "127.0.0.1"),  # userinfo: the host is after the '@'
    ("http://user:pass@0x7f.1/", "127.0.0.1"),
    ("http://127.0.0.1#@example.com/", "127.0.0.1"),  # the authority ends at '#'
    ("http://127.0.0.1?@example.com/", "127.0.0.1"),
    ("http://127.0.0.1\\@example.com/", "127.0.0.1"),  # '\' ends the authority like '/'
    ("http:\\\\127.0.0.1\\x", "127.0.0.1"),
    ("http:127.0.0.1/", "127.0.0.1"),  # special schemes ignore missing slashes
    ("HTTP://127.0.0.1/", "127.0.0.1"),
    ("  http://127.0.0.1/  ", "127.0.0.1"),
    ("http://127.0.\t0.1/", "127.0.0.1"),  # tabs and newlines are removed
    ("http://example.com:22/", "port 22"),
    ("http://example.com:6379/", "port 6379"),
    ("http://93.184.216.34:8080/", "port 8080"),
]

INVALID: list[str] = [
    "ftp://example.com/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_INFO",
    "dict://127.0.0.1:11211/",
    "javascript:alert(1)",
    "data:text/html,hi",
    "example.com",
    "",
    "http://",
    "http://[::1/",
    "http://[fe80::1%25eth0]/",  # zone ids are not URL syntax
    "http://256.0.0.1/",
    "http://1.2.3.4.5/",
    "http://0x100000000/",
    "http://127.0.0.1:99999/",
    "http://127.0.0.1:8o/",
    "http://exa mple.com/",
    "http://a..b/",
    "http://" + "a" * 9000 + ".com/",
    # '+', '-', '_' in IPv4 parts: never a number (C's strtoul would read some of them as one)
    "http://1.2.3.-4/",
    "http://+127.0.0.1/",
    "http://127.0.0.+1/",
    "http://127.0.0.1_/",
    "http://0x7f.0.0.0x-1/",
    "http://-2130706433/",
    # what browsers refuse (WHATWG), the fetcher refuses too
    "http://xn--a.example/",
    "http://xn--1ug.example/",
    "http://1.2.3.08/",
    "http://foo.0x4/",
]

ALLOWED: list[tuple[str, str]] = [
    ("http://93.184.216.34/", PUBLIC),
    ("https://example.com/path?q=1#frag", PUBLIC),
    ("http://EXAMPLE.COM./", PUBLIC),
    ("http://ｅｘａｍｐｌｅ.com/", PUBLIC),  # noqa: RUF001 - fullwidth letters map to ASCII
    ("http://1.1.1.1/", "1.1.1.1"),
    ("http://[2606:4700:4700::1111]/", "2606:4700:4700::1111"),
    ("http://[::ffff:93.184.216.34]/", "::ffff:5db8:d822"),  # mapped public IPv4
    ("http://[64:ff9b::5db8:d822]/", "64:ff9b::5db8:d822"),  # NAT64 of a public IPv4
    ("http://bücher.example/", PUBLIC),
    ("http://localhost.example.com.evil/", PUBLIC),  # only *.localhost is special
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket use in these tests is a bug: fail loudly instead of sending a packet."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("network I/O attempted in a pure test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def fake_resolver(host: str, port: int) -> Sequence[str]:
    if host in FAKE_DNS:
        return FAKE_DNS[host]
    if host.endswith(".example") or host == "localhost.example.com.evil":
        return [PUBLIC]
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def check(url: str, **kwargs: Any) -> netcheck.CheckResult:
    kwargs.setdefault("allowed_ports", [80, 443])
    kwargs.setdefault("allow_cidrs", "")
    return check_url(url, resolver=kwargs.pop("resolver", fake_resolver), **kwargs)


@pytest.mark.parametrize(("url", "why"), BLOCKED_LITERALS)
def test_blocked_literals(url: str, why: str) -> None:
    result = check(url)
    assert not result.ok
    assert result.code == BLOCKED_TARGET, result.reason
    assert why in result.reason


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://metadata.google.internal/computeMetadata/v1/", "169.254.169.254"),
        ("http://mixed.example/", "10.0.0.5"),  # one bad address is enough
        ("http://mixed6.example/", "fd00::7"),
        ("http://mapped.example/", "127.0.0.1"),
        ("http://rebind.example/", "loopback"),
    ],
)
def test_names_resolving_to_refused_addresses(url: str, why: str) -> None:
    result = check(url)
    assert (result.ok, result.code) == (False, BLOCKED_TARGET)
    assert why in result.reason
    assert result.host is not None and result.host in result.reason


@pytest.mark.parametrize("url", INVALID)
def test_invalid_urls(url: str) -> None:
    result = check(url)
    assert (result.ok, result.code) == (False, INVALID_URL), result.reason


@pytest.mark.parametrize(("url", "address"), ALLOWED)
def test_public_targets_allowed(url: str, address: str) -> None:
    result = check(url)
    assert result.ok, result.reason
    assert result.code is None
    assert address in result.addresses


def test_localhost_is_refused_without_a_lookup() -> None:
    calls: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return [PUBLIC]

    assert check("http://a.b.localhost/", resolver=resolver).code == BLOCKED_TARGET
    assert check("http://127.0.0.1/", resolver=resolver).code == BLOCKED_TARGET
    assert calls == []


def test_resolves_once_and_hands_back_the_checked_addresses() -> None:
    calls: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return [PUBLIC, PUBLIC, "2606:2800:220:1:248:1893:25c8:1946"]

    result = check("https://Example.com/x", resolver=resolver)
    assert result.ok
    assert calls == [("example.com", 443)]
    assert result.addresses == [PUBLIC, "2606:2800:220:1:248:1893:25c8:1946"]
    assert result.url is not None
    assert (result.url.host_header, result.url.path) == ("example.com", "/x")


def test_dns_failure() -> None:
    result = check("http://does-not-exist.invalid/")
    assert (result.ok, result.code, result.host) == (False, DNS_FAILED, "does-not-exist.invalid")
    empty = check("http://x.example/", resolver=lambda h, p: [])
    assert empty.code == DNS_FAILED


def test_allow_cidrs_let_an_operator_network_through() -> None:
    assert check("http://testnet.example/").code == BLOCKED_TARGET
    allowed = check("http://testnet.example/", allow_cidrs="172.30.0.0/16")
    assert allowed.ok and allowed.addresses == ["172.30.5.9"]
    assert check("http://127.0.0.1:8080/", allowed_ports=[8080], allow_cidrs="127.0.0.0/8").ok
    # the allowance is exactly the listed network, nothing next to it
    assert check("http://172.31.0.1/", allow_cidrs="172.30.0.0/16").code == BLOCKED_TARGET
    nets = [ipaddress.ip_network("10.1.0.0/16")]
    assert check("http://10.1.2.3/", allow_cidrs=nets).ok


def test_port_allowlist() -> None:
    assert check("http://93.184.216.34:8080/").code == BLOCKED_TARGET
    assert check("http://93.184.216.34:8080/", allowed_ports=[8080]).ok
    assert check("http://93.184.216.34:0080/").ok  # leading zeros are still port 80


@pytest.mark.parametrize(
    ("url", "serialized"),
    [
        ("HTTP://Ex\u00e4mple.COM:80/a b?c d#frag", "http://xn--exmple-cua.com/a%20b?c%20d"),
        ("https://[0:0::0:1]:443", "https://[::1]/"),
        ("http://0x7f.1:8080", "http://127.0.0.1:8080/"),
        ("http://\u2460\u2461\u2462.example/", "http://123.example/"),  # circled digits (NFKC)
    ],
)
def test_parse_url_normalizes_like_a_browser(url: str, serialized: str) -> None:
    assert netcheck.parse_url(url).serialize() == serialized


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("8.8.8.8", False),
        ("127.0.0.1", True),
        ("::ffff:8.8.8.8", False),
        ("::ffff:10.0.0.1", True),
        ("2002:808:808::1", False),  # 6to4 of a public address
        ("2002:c0a8:101::1", True),  # 6to4 of 192.168.1.1
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", True),  # Teredo client 192.0.2.45
        ("fe80::1%eth0", True),
    ],
)
def test_address_block_reason(address: str, blocked: bool) -> None:
    reason = netcheck.address_block_reason(ipaddress.ip_address(address))
    assert (reason is not None) == blocked, reason


def test_table_is_big_enough() -> None:
    assert len(BLOCKED_LITERALS) + len(INVALID) + len(ALLOWED) >= 40


# The allowed set is an explicit table. These decisions must not move with the Python patch
# release (`ipaddress.is_global` does: 2002:808:808::1 differs between 3.11.2 and 3.11.7, and
# the sandbox image runs another patch release than the worker).
ADDRESS_TABLE: list[tuple[str, str | None]] = [
    # IPv4: public unicast allowed; the special-purpose registry's local ranges refused
    ("8.8.8.8", None),
    ("1.0.0.1", None),
    ("192.31.196.1", None),  # AS112: globally reachable
    ("192.52.193.1", None),  # AMT: globally reachable
    ("223.255.255.254", None),
    ("0.1.2.3", "this network"),
    ("10.1.2.3", "private"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("127.0.0.2", "loopback"),
    ("169.254.169.254", "link-local"),
    ("172.16.5.4", "private"),
    ("192.0.0.170", "IETF protocol assignments"),
    ("192.0.2.9", "documentation"),
    ("192.88.99.1", "6to4 relay"),
    ("192.168.0.1", "private"),
    ("198.19.255.255", "benchmarking"),
    ("198.51.100.1", "documentation"),
    ("203.0.113.1", "documentation"),
    ("239.255.255.250", "multicast"),
    ("250.1.2.3", "reserved"),
    ("255.255.255.255", "broadcast"),
    # IPv6: global unicast 2000::/3 allowed, minus its refused table
    ("2606:4700:4700::1111", None),
    ("2a00:1450:4001:81c::200e", None),
    ("2620:4f:8000::1", None),  # AS112 direct delegation: globally reachable
    ("2001:db8::1", "documentation"),
    ("2001:2::1", "benchmarking"),
    ("2001:10::1", "ORCHID"),
    ("2001:20::1", "IETF protocol assignments"),
    ("2001:1::1", "IETF protocol assignments"),
    ("3fff::1", "documentation"),
    # outside 2000::/3: refused, whatever it is
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("::2", "IPv4-compatible"),
    ("::8.8.8.8", "deprecated"),  # IPv4-compatible of a public address: still refused
    ("::ffff:0:8.8.8.8", "deprecated"),  # IPv4-translated
    ("::1:0:0:1", "reserved (::/8)"),
    ("100::1", "discard-only"),
    ("100:0:0:1::1", "dummy prefix"),
    ("64:ff9b:1::1", "local-use NAT64"),
    ("5f00::1", "SRv6"),  # RFC 9602
    ("5f00:1:2:3::4", "SRv6"),
    ("4000::1", "outside global unicast"),
    ("1000::1", "outside global unicast"),
    ("fc00::1", "unique local"),
    ("fe80::1", "link-local"),
    ("fec0::1", "site-local"),
    ("ff05::2", "multicast"),
    # forms that carry an IPv4 address: judged by that address
    ("::ffff:8.8.8.8", None),
    ("::ffff:127.0.0.1", "127.0.0.1 is loopback"),
    ("64:ff9b::808:808", None),
    ("64:ff9b::a9fe:a9fe", "169.254.169.254 is link-local"),
    ("2002:808:808::1", None),  # 6to4 of 8.8.8.8: the case is_global changed on
    ("2002:a00:1::1", "10.0.0.1 is private"),
    ("2002:c058:6301::1", "192.88.99.1 is 6to4 relay"),
    ("2001:0:808:808:0:0:f7f7:f7f7", None),  # Teredo: server and client 8.8.8.8
    ("2001:0:808:808::ffff:ffff", "Teredo client IPv4 0.0.0.0"),
    ("2001:0:7f00:1::f7f7:f7f7", "Teredo server IPv4 127.0.0.1"),
]


@pytest.mark.parametrize(("address", "why"), ADDRESS_TABLE)
def test_address_table(address: str, why: str | None) -> None:
    reason = netcheck.address_block_reason(ipaddress.ip_address(address))
    if why is None:
        assert reason is None
    else:
        assert reason is not None and why in reason, reason


def test_address_table_does_not_ask_ipaddress_what_is_global(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: object) -> bool:
        raise AssertionError("the decision must come from the table")

    for cls in (ipaddress.IPv4Address, ipaddress.IPv6Address):
        for prop in ("is_global", "is_private", "is_reserved", "is_link_local", "is_loopback"):
            monkeypatch.setattr(cls, prop, property(refuse))
    for address, why in ADDRESS_TABLE:
        reason = netcheck.address_block_reason(ipaddress.ip_address(address))
        assert (reason is None) == (why is None), address


@pytest.mark.parametrize(("url", "host"), [
    ("http://evil.example\\@good.example/", "evil.example"),  # the fetcher goes to evil
    ("http://good.example@evil.example/", "evil.example"),
    ("http://fa\u00df.example/", "xn--fa-hia.example"),
    ("http://\u0dc1\u0dca\u200d\u0dbb\u0dd3.example/", "xn--10cl1a0b660p.example"),
])
def test_the_fetcher_connects_to_the_browser_host(url: str, host: str) -> None:
    result = check(url)
    assert result.ok, result.reason
    assert result.host == host
