"""URL parsing and the SSRF address check. Pure: no network I/O unless the resolver does it.

URLs are parsed by `weburl` (WHATWG URL standard, the parser every other part of the project
uses too), so that every spelling a browser would send to 127.0.0.1 (`2130706433`, `0x7f.1`,
fullwidth digits and ideographic dots, ...) is seen as 127.0.0.1 here too. A name is resolved
once; every address it resolves to must be in the allowed set, and the caller connects to those
checked addresses only (no second lookup, so DNS rebinding cannot swap them).

The allowed set is an explicit table (below), never `ipaddress.is_global`/`is_private`, whose
answers change between Python patch releases (`2002:808:808::1`: 3.11.2 and 3.11.7 disagree;
the sandbox image and the worker do not run the same patch release).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from . import weburl

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# A resolver maps (host, port) to address strings; it raises OSError when the name does not resolve.
Resolver = Callable[[str, int], Sequence[str]]

MAX_URL = 8192
DEFAULT_PORTS = {"http": 80, "https": 443}

INVALID_URL = "INVALID_URL"
BLOCKED_TARGET = "BLOCKED_TARGET"
DNS_FAILED = "DNS_FAILED"


class UrlError(ValueError):
    """The URL is not something a browser would fetch over http(s)."""


@dataclass(frozen=True)
class ParsedUrl:
    scheme: str  # "http" or "https"
    host: str  # ASCII host: punycode name, dotted IPv4, or IPv6 without brackets
    ip: IPAddress | None  # set when the host is an address literal
    port: int
    path: str  # request target: path and query, percent-encoded, never empty
    userinfo: bool = False  # the URL carried user:pass@ (ignored, never sent)

    @property
    def host_header(self) -> str:
        """Host header value; also the authority of `serialize`."""
        host = f"[{self.host}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def serialize(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.path}"


@dataclass(frozen=True)
class CheckResult:
    """Outcome of `check_url`. `code` is None when ok, else the report's error code."""

    ok: bool
    host: str | None
    addresses: list[str]
    reason: str
    code: str | None = None
    url: ParsedUrl | None = None
    dns_ms: float | None = None
    blocked: list[str] = field(default_factory=list)  # the refused addresses, if any


# --- URL parsing ----------------------------------------------------------------------------


def parse_url(url: str) -> ParsedUrl:
    """Parse an http(s) URL like a browser; raise UrlError when we would not fetch it."""
    if len(url) > MAX_URL:
        raise UrlError("URL longer than 8192 characters")
    try:
        parsed = weburl.parse(url)
    except weburl.WebUrlError as exc:
        raise UrlError(str(exc)) from None
    problem = weburl.fetch_problem(parsed)
    if problem is not None:
        raise UrlError(problem)
    port = parsed.effective_port
    assert port is not None  # http and https have default ports
    return ParsedUrl(parsed.scheme, parsed.host, parsed.ip, port, parsed.request_target,
                     userinfo=parsed.has_userinfo)


# --- address rules --------------------------------------------------------------------------
# The allowed set, explicitly:
#   IPv4: every address outside _V4_REFUSED (the IANA special-purpose registry entries that are
#         not globally reachable, plus multicast and the reserved class E);
#   IPv6: global unicast 2000::/3 outside _V6_REFUSED, plus the forms that carry an IPv4
#         address (IPv4-mapped, NAT64 64:ff9b::/96, 6to4, Teredo), judged by that IPv4 address.
# Everything else is refused; _V6_NAMED only gives the refusal a name.


def _nets(*specs: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), name) for net, name in specs)


_V4_REFUSED = _nets(
    ("0.0.0.0/8", "unspecified / this network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
)
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_V6_REFUSED = _nets(  # inside 2000::/3
    ("2001:db8::/32", "documentation"),
    ("2001:2::/48", "benchmarking"),
    ("2001:10::/28", "ORCHID (deprecated)"),
    ("2001::/23", "IETF protocol assignments"),
    ("3fff::/20", "documentation"),
)
_V6_NAMED = _nets(  # outside 2000::/3: refused in any case, named for the reason
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("100:0:0:1::/64", "dummy prefix"),
    ("::/8", "reserved (::/8)"),
    ("5f00::/16", "SRv6 SIDs (RFC 9602)"),
    ("fc00::/7", "unique local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")


def parse_cidrs(spec: str | Iterable[str]) -> list[IPNetwork]:
    """Parse FETCH_ALLOW_CIDRS (comma-separated) into networks; raises ValueError."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [ipaddress.ip_network(s.strip(), strict=False) for s in items if s.strip()]


def _low32(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)


def _carried_v4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """IPv4 addresses a packet to `ip` really goes to: mapped, NAT64, 6to4, Teredo."""
    if ip in _MAPPED:
        return [("IPv4-mapped", _low32(ip))]
    if ip in _NAT64:
        return [("NAT64", _low32(ip))]
    if ip in _SIX_TO_FOUR:
        return [("6to4", ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))]
    if ip in _TEREDO:  # server in bits 32-63; the client is stored XOR-ed in the low 32 bits
        server = ipaddress.IPv4Address((int(ip) >> 64) & 0xFFFFFFFF)
        client = ipaddress.IPv4Address(~int(ip) & 0xFFFFFFFF)
        return [("Teredo server", server), ("Teredo client", client)]
    return []


def _v4_reason(ip: ipaddress.IPv4Address) -> str | None:
    for net, name in _V4_REFUSED:
        if ip in net:
            return f"{ip} is {name} ({net})"
    return None


def _v6_reason(ip: ipaddress.IPv6Address, allow: Sequence[IPNetwork]) -> str | None:
    if ip.scope_id:
        return f"{ip} has a zone id (link-scoped)"
    if ip in _COMPATIBLE or ip in _TRANSLATED:
        for net, name in _V6_NAMED[:2]:  # :: and ::1 are named as such, not as 0.0.0.x
            if ip in net:
                return f"{ip} is {name} ({net})"
        form = "IPv4-compatible" if ip in _COMPATIBLE else "IPv4-translated"
        why = address_block_reason(_low32(ip), allow) or f"{_low32(ip)}, a deprecated form"
        return f"{ip} embeds {form} IPv4 {why}"
    carried = _carried_v4(ip)
    for kind, v4 in carried:
        inner = address_block_reason(v4, allow)
        if inner is not None:
            return f"{ip} embeds {kind} IPv4 {inner}"
    if carried:
        return None  # what we would reach is the public IPv4 address it carries
    if ip not in _V6_GLOBAL_UNICAST:
        named = next((f"{n} ({net})" for net, n in _V6_NAMED if ip in net), None)
        return f"{ip} is {named or 'outside global unicast (2000::/3)'}"
    for net, name in _V6_REFUSED:
        if ip in net:
            return f"{ip} is {name} ({net})"
    return None


def address_block_reason(ip: IPAddress, allow: Sequence[IPNetwork] = ()) -> str | None:
    """None if `ip` is in the allowed set (or an operator's FETCH_ALLOW_CIDRS), else a reason
    naming the address and the rule."""
    if any(ip.version == net.version and ip in net for net in allow):
        return None
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_reason(ip)
    return _v6_reason(ip, allow)


# --- the check ------------------------------------------------------------------------------


def system_resolver(host: str, port: int) -> list[str]:
    """getaddrinfo, TCP only. Raises OSError (socket.gaierror) when the name does not resolve."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


def is_localhost_name(host: str) -> bool:
    return host == "localhost" or host.endswith(".localhost")


def check_url(
    url: str,
    allowed_ports: Iterable[int] = (80, 443),
    allow_cidrs: Sequence[IPNetwork] | str = (),
    resolver: Resolver = system_resolver,
    clock: Callable[[], float] | None = None,
) -> CheckResult:
    """Parse, check the port, resolve once and check every address.

    ok=True means: connect to one of `addresses` (and only those) on `url.port`, sending
    `url.host_header` as Host. Network I/O happens only inside `resolver`, and only for names.
    """
    allow = parse_cidrs(allow_cidrs) if isinstance(allow_cidrs, str) else list(allow_cidrs)
    try:
        parsed = parse_url(url)
    except UrlError as exc:
        return CheckResult(False, None, [], str(exc), INVALID_URL)
    if parsed.port not in set(allowed_ports):
        return _refuse(parsed, [], f"port {parsed.port} is not in the allowed ports")
    if parsed.ip is not None:
        return _check_addresses(parsed, [str(parsed.ip)], allow, None)
    if is_localhost_name(parsed.host):
        return _refuse(parsed, [], f"host {parsed.host} is a localhost name")
    return _resolve_and_check(parsed, allow, resolver, clock)


def _resolve_and_check(parsed: ParsedUrl, allow: Sequence[IPNetwork], resolver: Resolver,
                       clock: Callable[[], float] | None) -> CheckResult:
    start = clock() if clock else 0.0
    try:
        found = list(dict.fromkeys(resolver(parsed.host, parsed.port)))
    except (OSError, UnicodeError) as exc:
        reason = f"cannot resolve {parsed.host}: {exc}"
        dns_ms = (clock() - start) * 1000 if clock else None
        return CheckResult(False, parsed.host, [], reason[:2048], DNS_FAILED, parsed, dns_ms)
    dns_ms = (clock() - start) * 1000 if clock else None
    if not found:
        return CheckResult(False, parsed.host, [], f"{parsed.host} has no address", DNS_FAILED,
                           parsed, dns_ms)
    return _check_addresses(parsed, found, allow, dns_ms)


def _check_addresses(parsed: ParsedUrl, found: list[str], allow: Sequence[IPNetwork],
                     dns_ms: float | None) -> CheckResult:
    reasons: list[str] = []
    blocked: list[str] = []
    for text in found:
        try:
            reason = address_block_reason(ipaddress.ip_address(text), allow)
        except ValueError:
            reason = f"{text[:64]!r} is not an IP address"
        if reason is not None:
            reasons.append(reason)
            blocked.append(text)
    if reasons:
        what = f"{parsed.host} resolves to a refused address: " if parsed.ip is None else ""
        return CheckResult(False, parsed.host, found, (what + "; ".join(reasons))[:2048],
                           BLOCKED_TARGET, parsed, dns_ms, blocked)
    return CheckResult(True, parsed.host, found, "ok", None, parsed, dns_ms)


def _refuse(parsed: ParsedUrl, found: list[str], reason: str) -> CheckResult:
    return CheckResult(False, parsed.host, found, reason, BLOCKED_TARGET, parsed)
