"""One place for URL handling on the worker side: the cache and blocklist key of a URL, its
canonical host, and the site (registrable domain) it belongs to.

Pure string functions (no network). A URL that does not parse raises ValueError with a clear
message; the `*_of` helpers return None instead, for URLs read from untrusted reports.
"""

from __future__ import annotations

import encodings.idna
import ipaddress
import re
import socket
from functools import cache, lru_cache
from urllib.parse import SplitResult, quote, unquote, urlsplit

from publicsuffixlist import PublicSuffixList

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21}
_LABEL_DOTS = re.compile("[.\u3002\uff0e\uff61]")  # the separators IDNA treats as dots
_ASCII_HOST = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
# What inet_aton would accept as IPv4 (1-4 parts, decimal/octal/hex) - browsers accept it too.
_LOOSE_IPV4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$")
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
_QUERY_SAFE = _PATH_SAFE + "?"
_PERCENT = re.compile(r"%[0-9a-fA-F]{2}")


def _encode_label(label: str) -> str:
    """One host label to its ASCII (IDNA) form."""
    if label.isascii():
        return label.lower()
    try:  # nameprep + punycode, as a resolver would (also maps e.g. fullwidth letters)
        return encodings.idna.ToASCII(label).decode("ascii").lower()
    except UnicodeError:
        # Labels nameprep rejects still need a stable key; raw punycode keeps them distinct.
        return "xn--" + label.lower().encode("punycode").decode("ascii")


def canonical_ip(host: str) -> str | None:
    """The canonical text of an IP literal host, or None when the host is a name."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _LOOSE_IPV4.match(host):
        try:  # pure conversion, no network: 0x7f.1 / 2130706433 / 127.1 -> 127.0.0.1
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            return None
    return None


def canonical_host(raw: str) -> str:
    """Lower-case, IDNA-encoded, canonical IP text; ValueError when it is no valid host."""
    # Browsers decode %-escapes in hosts, so %65vil.com must not slip past the blocklist.
    host = unquote(raw).strip().rstrip(".")
    if not host:
        raise ValueError("URL has no host")
    ip = canonical_ip(host.lower())
    if ip is not None:
        return ip
    labels = _LABEL_DOTS.split(host)
    if any(not label for label in labels):
        raise ValueError(f"invalid host {raw[:100]!r}: empty label")
    ascii_host = ".".join(_encode_label(label) for label in labels)
    if not _ASCII_HOST.match(ascii_host):
        raise ValueError(f"invalid host {raw[:100]!r}: characters not allowed in a host name")
    return ascii_host


def split_url(url: str) -> SplitResult:
    """urlsplit for an absolute URL with a host; ValueError with a clear message otherwise."""
    if not isinstance(url, str):
        raise ValueError(f"URL must be a string, not {type(url).__name__}")
    text = url.strip()
    if not text:
        raise ValueError("URL is empty")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise ValueError(f"unparsable URL {text[:100]!r}: {exc}") from None
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"not an absolute URL with a host: {text[:100]!r}")
    return parts


def _port(parts: SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError:
        raise ValueError(f"invalid port in URL {parts.netloc[:100]!r}") from None


def _fix_escapes(text: str, safe: str) -> str:
    """Percent-encode what must be encoded (spaces, non-ASCII); upper-case existing escapes
    so %2f and %2F give one key."""
    quoted = quote(text, safe=safe, errors="replace")
    return _PERCENT.sub(lambda m: m.group(0).upper(), quoted)


# The rules look at the same few URLs many times per report, and a fleet sees the same hosts
# over and over: these pure string functions are memoised (bounded).
@lru_cache(maxsize=8192)
def normalize_url(url: str) -> str:
    """The result-cache and blocklist key of a URL.

    Lower-case scheme and host, IDNA-encode the host, canonical IP text, drop a trailing dot of
    the host, drop default ports and the fragment, keep userinfo/path/query, empty path -> '/'.
    Raises ValueError (with a clear message) only for input that cannot be parsed as an absolute
    URL with a valid host.
    """
    parts = split_url(url)
    scheme = parts.scheme.lower()
    userinfo = parts.netloc.rpartition("@")[0]
    host = canonical_host(parts.hostname or "")
    if "[" in parts.netloc and ":" not in host:  # [v1.x] IPvFuture and such: no real host
        raise ValueError(f"invalid bracketed host in URL {parts.netloc[:100]!r}")
    port = _port(parts)
    # An IPv6 zone id's % must be escaped again inside a URL.
    netloc = f"[{host.replace('%', '%25')}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc = f"{netloc}:{port}"
    if userinfo or "@" in parts.netloc:
        netloc = f"{userinfo}@{netloc}"
    path = _fix_escapes(parts.path, _PATH_SAFE) or "/"
    query = _fix_escapes(parts.query, _QUERY_SAFE)
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")


@lru_cache(maxsize=8192)
def host_of(url: str | None) -> str | None:
    """The canonical host of a URL from the report, or None when there is none."""
    if not url:
        return None
    try:
        parts = split_url(url)
        return canonical_host(parts.hostname or "")
    except ValueError:
        return None


@cache
def _psl() -> PublicSuffixList:
    # Built once from the list bundled with the package (no network).
    return PublicSuffixList()


@lru_cache(maxsize=8192)
def registrable_domain(host: str) -> str:
    """The site a host belongs to: its registrable domain (eTLD+1), the IP itself for an IP
    literal, or the host itself when it has none (localhost, a bare public suffix)."""
    if canonical_ip(host) is not None or ":" in host:
        return host
    site = _psl().privatesuffix(host)
    return str(site) if site else host


def site_of(url: str | None) -> str | None:
    host = host_of(url)
    return registrable_domain(host) if host else None
