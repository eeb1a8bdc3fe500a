"""URL parsing and the SSRF address check. Pure: no network I/O unless the resolver does it.

Hosts are parsed the way a browser does (WHATWG URL standard), so that every spelling a browser
would send to 127.0.0.1 (`2130706433`, `0x7f.1`, fullwidth digits and ideographic dots, ...) is
seen as 127.0.0.1 here too. A name is resolved once; every address it resolves to must be
public, and the caller connects to those checked addresses only (no second lookup, so DNS
rebinding cannot swap them).
"""

from __future__ import annotations

import ipaddress
import socket
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# A resolver maps (host, port) to address strings; it raises OSError when the name does not resolve.
Resolver = Callable[[str, int], Sequence[str]]

MAX_URL = 8192
DEFAULT_PORTS = {"http": 80, "https": 443}

INVALID_URL = "INVALID_URL"
BLOCKED_TARGET = "BLOCKED_TARGET"
DNS_FAILED = "DNS_FAILED"

# WHATWG "forbidden domain code points" (after percent-decoding), plus '%' left over.
_FORBIDDEN_HOST = set("\x00\t\n\r #/:<>?@[\\]^|%\x7f") | {chr(c) for c in range(0x20)}
# Code points UTS46 maps to nothing (soft hyphen, zero-width joiners, variation selectors, BOM):
# removing them makes `lo\u00adcalhost` the same host as `localhost`, as in a browser.
_IGNORED = {"\u00ad", "\u034f", "\u180b", "\u180c", "\u180d", "\u200b", "\u200c", "\u200d",
            "\u2060", "\ufeff"} | {chr(c) for c in range(0xFE00, 0xFE10)}
# Full stops a browser treats as '.', even where NFKC leaves them alone.
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


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


# --- URL and host parsing -------------------------------------------------------------------


def parse_url(url: str) -> ParsedUrl:
    """Split an http(s) URL like a browser; raise UrlError when a browser would not fetch it."""
    if len(url) > MAX_URL:
        raise UrlError("URL longer than 8192 characters")
    # Browsers strip leading/trailing C0 controls and spaces, and drop tabs/newlines anywhere.
    url = url.strip("".join(chr(c) for c in range(0x21))).replace("\t", "")
    url = url.replace("\n", "").replace("\r", "")
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise UrlError(f"scheme not allowed: {scheme[:32]!r} (only http and https)")
    # Special schemes ignore any number of slashes and treat '\' as '/' (not in the query).
    before, q, after = rest.partition("?")
    rest = (before.replace("\\", "/") + q + after).lstrip("/")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    _userinfo, at, hostport = authority.rpartition("@")
    host_raw, port = _split_port(hostport, scheme)
    host, ip = parse_host(host_raw)
    return ParsedUrl(scheme, host, ip, port, _request_target(tail), userinfo=bool(at))


def _split_port(hostport: str, scheme: str) -> tuple[str, int]:
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            raise UrlError("unterminated IPv6 address")
        host, after = hostport[: close + 1], hostport[close + 1 :]
        if after and not after.startswith(":"):
            raise UrlError("garbage after IPv6 address")
        port_s = after[1:]
    else:
        host, _, port_s = hostport.partition(":")
    if not port_s:
        return host, DEFAULT_PORTS[scheme]
    if not port_s.isascii() or not port_s.isdigit() or int(port_s) > 65535:
        raise UrlError(f"invalid port {port_s[:16]!r}")
    return host, int(port_s)


def _request_target(tail: str) -> str:
    """Path and query, percent-encoded like a browser would send them; the fragment is dropped."""
    tail = tail.partition("#")[0]
    path, q, query = tail.partition("?")
    path = urllib.parse.quote(path or "/", safe="/%:@!$&'()*+,;=-._~")
    if q:
        path += "?" + urllib.parse.quote(query, safe="/%:@!$&'()*+,;=-._~?")
    return path


def parse_host(raw: str) -> tuple[str, IPAddress | None]:
    """WHATWG host parser: returns (ascii_host, ip-or-None); raises UrlError."""
    if raw.startswith("["):
        return _parse_ipv6_literal(raw)
    try:
        text = urllib.parse.unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise UrlError("host is not valid UTF-8 after percent-decoding") from None
    host = _domain_to_ascii(text)
    ipv4 = parse_ipv4(host)
    if ipv4 is not None:
        return str(ipv4), ipv4
    return host, None


def _parse_ipv6_literal(raw: str) -> tuple[str, IPAddress]:
    inner = raw[1:-1]
    if "%" in inner:  # zone ids are not part of URLs; a browser refuses them
        raise UrlError("IPv6 zone identifiers are not allowed")
    try:
        ip = ipaddress.IPv6Address(inner)
    except ValueError:
        raise UrlError(f"invalid IPv6 address {inner[:64]!r}") from None
    return str(ip), ip


def _domain_to_ascii(text: str) -> str:
    """UTS46-like mapping: drop ignored code points, NFKC, lower-case, map dots, then IDNA."""
    text = "".join(c for c in text if c not in _IGNORED)
    text = unicodedata.normalize("NFKC", text).translate(_DOTS).lower()
    text = text.rstrip(".")  # `127.0.0.1.` and `localhost.` are the same hosts without the dot
    if not text:
        raise UrlError("empty host")
    if any(c in _FORBIDDEN_HOST for c in text):
        raise UrlError("forbidden character in host")
    labels = text.split(".")
    if any(not label for label in labels):
        raise UrlError("empty label in host")
    try:
        ascii_labels = [lb if lb.isascii() else lb.encode("idna").decode("ascii") for lb in labels]
    except UnicodeError:
        raise UrlError("host fails IDNA conversion") from None
    host = ".".join(ascii_labels).lower()
    if len(host) > 253 or any(len(lb) > 63 for lb in ascii_labels):
        raise UrlError("host name too long")
    return host


def parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """WHATWG IPv4 parser. None if `host` is a domain; UrlError if it looks numeric but is bad.

    Accepts what browsers accept: 1 to 4 parts, each decimal, octal (leading 0) or hex (0x),
    the last part filling the remaining bytes (`127.1`, `2130706433`, `0x7f.1`).
    """
    parts = host.split(".")
    if not _ends_in_number(parts[-1]):
        return None
    if len(parts) > 4:
        raise UrlError("IPv4 address with more than four parts")
    numbers = [_ipv4_number(p) for p in parts]
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise UrlError("IPv4 address part out of range")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _ends_in_number(last: str) -> bool:
    if last.isascii() and last.isdigit():
        return True
    return last[:2] in ("0x", "0X") and all(c in "0123456789abcdefABCDEF" for c in last[2:])


def _ipv4_number(part: str) -> int:
    base, digits = 10, part
    if part[:2] in ("0x", "0X"):
        base, digits = 16, part[2:]
    elif len(part) > 1 and part.startswith("0"):
        base, digits = 8, part[1:]
    if not digits:
        return 0  # `0x` alone is zero in the WHATWG parser
    try:
        if not digits.isascii():
            raise ValueError
        return int(digits, base)
    except ValueError:
        raise UrlError(f"invalid IPv4 part {part[:16]!r}") from None


# --- address rules --------------------------------------------------------------------------


def _nets(*specs: tuple[str, str]) -> list[tuple[IPNetwork, str]]:
    return [(ipaddress.ip_network(net), name) for net, name in specs]


# Named explicitly so the refusal says why; `is_global` below is the catch-all.
_V4_RULES = _nets(
    ("0.0.0.0/8", "unspecified / this network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
)
_V6_RULES = _nets(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("100::/64", "discard-only"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("2001:db8::/32", "documentation"),
    ("2001:10::/28", "ORCHID"),
    ("2001:2::/48", "benchmarking"),
    ("3fff::/20", "documentation"),
    ("fc00::/7", "unique local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")


def parse_cidrs(spec: str | Iterable[str]) -> list[IPNetwork]:
    """Parse FETCH_ALLOW_CIDRS (comma-separated) into networks; raises ValueError."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [ipaddress.ip_network(s.strip(), strict=False) for s in items if s.strip()]


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """IPv4 addresses an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo)."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _MAPPED:
        return [("IPv4-mapped", low32)]
    if ip in _TRANSLATED:
        return [("IPv4-translated", low32)]
    if ip in _COMPATIBLE:
        return [("IPv4-compatible", low32)]
    if ip in _NAT64:
        return [("NAT64", low32)]
    if ip in _SIX_TO_FOUR:
        return [("6to4", ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))]
    if ip in _TEREDO:
        server, client = ip.teredo or (low32, low32)  # client is stored XOR-ed; teredo undoes it
        return [("Teredo server", server), ("Teredo client", client)]
    return []


def address_block_reason(ip: IPAddress, allow: Sequence[IPNetwork] = ()) -> str | None:
    """None if `ip` may be fetched, else a reason naming the address and the rule."""
    if any(ip.version == net.version and ip in net for net in allow):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return f"{ip} has a zone id (link-scoped)"
    rules = _V4_RULES if ip.version == 4 else _V6_RULES
    for net, name in rules:
        if ip in net:
            return f"{ip} is {name} ({net})"
    if isinstance(ip, ipaddress.IPv6Address):
        for kind, v4 in _embedded_v4(ip):
            inner = address_block_reason(v4, allow)
            if inner is not None:
                return f"{ip} embeds {kind} IPv4 {inner}"
            if kind in ("IPv4-mapped", "NAT64"):
                return None  # the embedded public IPv4 is what we would reach
        if ip in _COMPATIBLE or ip in _TRANSLATED:
            return f"{ip} is a deprecated IPv4-compatible/translated address"
    if not ip.is_global:
        return f"{ip} is not globally routable"
    return None


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
