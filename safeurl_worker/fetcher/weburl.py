"""URLs as a browser sees them (WHATWG URL standard): the one URL parser of the project.

The fetcher (every hop), the worker's refusal check, the analysis, the blocklist and the result
cache all parse URLs here, so they all see the same scheme, userinfo, host, port and path - the
ones a browser would use. Parsing, serialization and relative resolution are Ada's (`ada-url`:
the URL parser of Node.js, tested against the web-platform-tests). On top of it, this module
adds the host rules Ada 4.0 leaves out, with the maintained `idna` package (UTS #46,
nontransitional, as browsers do):

* an ASCII `xn--` label must be valid Punycode of a valid UTS #46 label (Ada keeps `xn--a`,
  which browsers refuse);
* ZERO WIDTH (NON-)JOINER stay in the label where CONTEXTJ allows them (Ada drops them, so
  `ශ්‍රී` would become `xn--10cl1a0b` where browsers use `xn--10cl1a0b660p`).

`WebUrl.host` is the canonical host everyone compares: ASCII, lower-case, IPv6 without brackets,
without a trailing dot (`example.com.` names the same DNS host as `example.com`).
`fetch_problem` says why a parsed URL is not something we fetch (http/https only, a host DNS can
carry, no IPv4-looking host with '+', '-' or '_').

Lives in the fetcher package because the sandbox image copies only `safeurl_worker/fetcher/`.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import ada_url
import idna
import idna.core

HostKind = Literal["domain", "ipv4", "ipv6", "opaque", "empty"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SPECIAL_PORTS: dict[str, int | None] = {
    "http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21, "file": None,
}
FETCHABLE_SCHEMES = ("http", "https")
_JOINERS = ("\u200c", "\u200d")
_JOINER_HINT = re.compile("[\u200c\u200d]|%e2%80%8[cd]", re.IGNORECASE)
_C0_AND_SPACE = "".join(chr(c) for c in range(0x21))
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")
# A last label that would be an IPv4 number but for '+', '-' or '_': C's strtoul and some
# resolvers read `-1`, `+0x7f` or `1_0` as numbers; browsers send them to DNS. Refused.
_SIGNED_NUMBER = re.compile(r"[0-9+\-_]+|0[xX][0-9a-fA-F+\-_]*")


class WebUrlError(ValueError):
    """The input is not a URL a browser would parse (or a host it would accept)."""


@dataclass(frozen=True, slots=True)
class WebUrl:
    """One parsed URL. Field names follow the WHATWG URL API where they exist."""

    href: str  # the browser's serialization (URL.href), fragment included
    scheme: str  # lower-case, without ':'
    username: str  # percent-encoded, as in href
    password: str
    host: str  # canonical: ASCII, IPv6 without brackets, no trailing dot; "" when none
    host_kind: HostKind
    port: int | None  # an explicit, non-default port; None means the scheme's default
    pathname: str
    search: str  # '?query' or ""
    hash: str  # '#fragment' or ""

    @property
    def special(self) -> bool:
        return self.scheme in SPECIAL_PORTS

    @property
    def has_userinfo(self) -> bool:
        return bool(self.username or self.password)

    @property
    def userinfo(self) -> str:
        return self.username + (f":{self.password}" if self.password else "")

    @property
    def ip(self) -> IPAddress | None:
        if self.host_kind == "ipv4":
            return ipaddress.IPv4Address(self.host)
        if self.host_kind == "ipv6":
            return ipaddress.IPv6Address(self.host)
        return None

    @property
    def effective_port(self) -> int | None:
        return self.port if self.port is not None else SPECIAL_PORTS.get(self.scheme)

    @property
    def authority(self) -> str:
        """host[:port] as in a Host header (IPv6 in brackets, default port left out)."""
        host = f"[{self.host}]" if self.host_kind == "ipv6" else self.host
        return host if self.port is None else f"{host}:{self.port}"

    @property
    def request_target(self) -> str:
        """Path and query as sent in the request line (the fragment never leaves the browser)."""
        return (self.pathname or "/") + self.search

    def key(self) -> str:
        """Canonical text without the fragment: the result-cache and blocklist key.

        The browser's serialization with the canonical host and upper-case %-escapes (`%2f` and
        `%2F` are one URL to every server), so spellings a browser would send to the same
        resource give one key.
        """
        if self.host_kind == "empty" and not self.href.startswith(f"{self.scheme}://"):
            return _upper_escapes(self.href.partition("#")[0])  # mailto:, data:, ... (no host)
        userinfo = f"{self.userinfo}@" if self.has_userinfo else ""
        rest = _upper_escapes(self.pathname + self.search)
        return f"{self.scheme}://{userinfo}{self.authority}{rest}"


def _upper_escapes(text: str) -> str:
    return _ESCAPE.sub(lambda m: m.group(0).upper(), text)


# --- parsing ------------------------------------------------------------------------------


def parse(url: str, base: str | None = None) -> WebUrl:
    """Parse `url` (relative to `base`, if given) exactly like a browser; WebUrlError if it
    would fail there too."""
    if not isinstance(url, str) or not (base is None or isinstance(base, str)):
        raise WebUrlError("URL must be a string")
    return _parse(_usv(url), None if base is None else _usv(base))


def _usv(text: str) -> str:
    """A string as a browser's URL API receives it (USVString): a lone surrogate becomes U+FFFD,
    a surrogate pair the character it encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


@lru_cache(maxsize=4096)  # a report repeats its URLs; a fleet sees the same ones over and over
def _parse(url: str, base: str | None) -> WebUrl:
    base_href = None if base is None else _parse(base, None).href
    try:
        parsed = ada_url.URL(url, base_href)
    except ValueError:  # UnicodeEncodeError (lone surrogates) is a ValueError too
        where = "" if base is None else f" against base {base[:100]!r}"
        raise WebUrlError(f"not a valid URL: {url[:100]!r}{where}") from None
    # Each attribute read is a call into Ada: read each once.
    scheme, host_type, hostname = parsed.protocol[:-1], parsed.host_type, parsed.hostname
    kind = _host_kind(host_type, hostname, scheme)
    if kind == "domain":
        if _JOINER_HINT.search(url):
            base_scheme = None if base_href is None else base_href.partition(":")[0]
            hostname = _keep_joiners(parsed, hostname, raw_host(url, base_scheme))
        if "xn--" in hostname:
            for label in hostname.split("."):
                if label.startswith("xn--"):
                    _check_a_label(label)
        hostname = hostname.removesuffix(".")
    elif kind == "ipv6":
        hostname = hostname[1:-1]
    port = parsed.port
    return WebUrl(
        href=parsed.href, scheme=scheme, username=parsed.username, password=parsed.password,
        host=hostname, host_kind=kind, port=int(port) if port else None,
        pathname=parsed.pathname, search=parsed.search, hash=parsed.hash,
    )


def _host_kind(host_type: ada_url.HostType, hostname: str, scheme: str) -> HostKind:
    if host_type == ada_url.HostType.IPV4:
        return "ipv4"
    if host_type == ada_url.HostType.IPV6:
        return "ipv6"
    if not hostname:
        return "empty"
    return "domain" if scheme in SPECIAL_PORTS else "opaque"


def join(base: str, ref: str) -> str | None:
    """Resolve `ref` against `base` like a browser (links, form actions, Location, Refresh).

    Returns the absolute URL (fragment kept), or None where a browser would fail to resolve it
    (then the link goes nowhere). `javascript:` and `data:` references come back as absolute
    URLs of their own scheme.
    """
    try:
        return parse(ref, base).href
    except WebUrlError:
        return None


def parse_host(text: str) -> tuple[str, HostKind]:
    """A bare host (a blocklist entry: `Example.COM`, `faß.de`, `0x7f.1`, `[::1]`) through the
    same host parser as a URL; returns (canonical host, kind), raises WebUrlError."""
    if ":" in text and not text.startswith("["):
        text = f"[{text}]"  # a bare IPv6 address; anything else with ':' fails in brackets
    if not text or any(c in text for c in "/\\?#@") or ":" in text.rpartition("]")[2]:
        raise WebUrlError(f"not a host: {text[:100]!r}")
    parsed = parse(f"http://{text}/")
    if parsed.port is not None or parsed.host_kind == "empty":
        raise WebUrlError(f"not a host: {text[:100]!r}")
    return parsed.host, parsed.host_kind


# --- the host rules Ada leaves out ------------------------------------------------------------


def _keep_joiners(parsed: ada_url.URL, hostname: str, raw: str | None) -> str:
    """The host with ZWJ/ZWNJ kept, as nontransitional UTS #46 does (Ada drops them)."""
    decoded = None if raw is None else _percent_decode(raw)
    # Only when `raw` really is the host Ada parsed (same result through Ada's host parser).
    if raw is None or decoded is None or not any(j in decoded for j in _JOINERS) \
            or _ada_host(raw) != hostname:
        return hostname
    parsed.hostname = _domain_to_ascii(decoded)
    return parsed.hostname


def _percent_decode(text: str) -> str | None:
    try:
        return urllib.parse.unquote_to_bytes(text).decode("utf-8")
    except UnicodeError:
        return None


def _ada_host(raw: str) -> str | None:
    probe = ada_url.URL("http://h/")
    try:
        probe.hostname = raw
    except ValueError:
        return None
    return probe.hostname


def _domain_to_ascii(domain: str) -> str:
    """UTS #46 ToASCII, nontransitional, without STD3 rules (as the WHATWG host parser)."""
    try:
        mapped = idna.core.uts46_remap(domain, std3_rules=False, transitional=False)
    except idna.IDNAError as exc:
        raise WebUrlError(f"host fails UTS #46 mapping: {exc}") from None
    labels = []
    for label in mapped.split("."):
        if label.isascii():
            labels.append(label)
            continue
        _check_joiners(label)
        labels.append("xn--" + label.encode("punycode").decode("ascii"))
    return ".".join(labels)


def _check_joiners(label: str) -> None:
    for pos, char in enumerate(label):
        if char in _JOINERS:
            try:
                ok = idna.core.valid_contextj(label, pos)
            except (idna.IDNAError, ValueError):
                ok = False
            if not ok:
                raise WebUrlError(f"joiner U+{ord(char):04X} not allowed here in {label!r}")


def _check_a_label(label: str) -> None:
    """A Punycode label must decode to a valid, non-ASCII UTS #46 label that encodes back."""
    try:
        unicode = label[4:].encode("ascii").decode("punycode")
    except (UnicodeError, ValueError, IndexError):
        raise WebUrlError(f"invalid Punycode label {label[:70]!r}") from None
    try:
        mapped = idna.core.uts46_remap(unicode, std3_rules=False, transitional=False)
    except idna.IDNAError:
        mapped = None
    canonical = "xn--" + unicode.encode("punycode").decode("ascii") if unicode else ""
    if (not unicode or unicode.isascii() or mapped != unicode
            or unicodedata.normalize("NFC", unicode) != unicode or canonical != label):
        raise WebUrlError(f"invalid Punycode label {label[:70]!r}")
    try:  # the Bidi rule (RFC 5893) for labels with right-to-left characters
        idna.core.check_bidi(unicode)
    except idna.IDNAError:
        raise WebUrlError(f"label {label[:70]!r} breaks the Bidi rule") from None
    _check_joiners(unicode)


def raw_host(url: str, base_scheme: str | None = None) -> str | None:
    """The host text of `url` as written, if `url` carries its own authority (WHATWG states
    'scheme' to 'host', special schemes only); None when the host comes from the base."""
    text = url.strip(_C0_AND_SPACE).replace("\t", "").replace("\n", "").replace("\r", "")
    match = _SCHEME.match(text)
    if match:
        scheme, rest = match.group(1).lower(), text[match.end():]
        if scheme not in SPECIAL_PORTS or scheme == "file":
            return None
        if scheme == base_scheme and not (len(rest) >= 2 and set(rest[:2]) <= {"/", "\\"}):
            return None  # 'http:x' against an http base is a relative path
    elif base_scheme in SPECIAL_PORTS:
        rest = text
        if not (len(rest) >= 2 and set(rest[:2]) <= {"/", "\\"}):
            return None
    else:
        return None
    rest = rest.lstrip("/\\")
    end = min((i for i in map(rest.find, "/\\?#") if i >= 0), default=len(rest))
    hostport = rest[:end].rpartition("@")[2]
    if hostport.startswith("["):
        return hostport[: hostport.find("]") + 1]
    return hostport.partition(":")[0]


# --- what we fetch --------------------------------------------------------------------------


def fetch_problem(url: WebUrl) -> str | None:
    """Why a parsed URL is not fetched (refused as INVALID_URL), or None.

    Browsers parse these too, but no fetch of ours should go there: other schemes, hosts DNS
    cannot carry (empty labels, over-long names), and IPv4-looking hosts with '+', '-' or '_'.
    """
    if url.scheme not in FETCHABLE_SCHEMES:
        return f"scheme not allowed: {url.scheme[:32]!r} (only http and https)"
    if url.host_kind != "domain":
        return None  # IP literals are parsed already; http(s) always has a host
    labels = url.host.split(".")
    if any(not label for label in labels):
        return f"empty label in host {url.host[:100]!r}"
    if len(url.host) > 253 or any(len(label) > 63 for label in labels):
        return "host name too long"
    if _SIGNED_NUMBER.fullmatch(labels[-1]) and any(c in "+-_" for c in labels[-1]):
        return f"invalid IPv4 address {url.host[:100]!r}: '+', '-' or '_' in a number"
    return None


__all__ = ["FETCHABLE_SCHEMES", "SPECIAL_PORTS", "HostKind", "WebUrl", "WebUrlError",
           "fetch_problem", "join", "parse", "parse_host", "raw_host"]
