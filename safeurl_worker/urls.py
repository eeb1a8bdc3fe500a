"""One place for URL handling on the worker side: the cache and blocklist key of a URL, its
canonical host, and the site (registrable domain) it belongs to.

Every URL is parsed by `fetcher.weburl` (WHATWG URL standard, the parser the fetcher uses for
every hop), so the analysis, the blocklist and the cache key see the host the fetcher connected
to, which is the host a browser would connect to: `http://evil.test\\@good.example/` is
`evil.test` everywhere, `faß.de` is `xn--fa-hia.de` (UTS #46 nontransitional) everywhere.

Pure string functions (no network). A URL that does not parse raises ValueError with a clear
message; the `*_of` helpers return None instead, for URLs read from untrusted reports.
"""

from __future__ import annotations

from functools import cache, lru_cache

from publicsuffixlist import PublicSuffixList

from .fetcher import weburl
from .fetcher.weburl import WebUrl, WebUrlError, raw_host

__all__ = ["WebUrl", "WebUrlError", "canonical_host", "canonical_ip", "host_of", "normalize_url",
           "parse_url", "raw_host", "registrable_domain", "site_of"]


def parse_url(url: str) -> WebUrl:
    """An absolute URL parsed like a browser; ValueError (WebUrlError) when it is not one."""
    return weburl.parse(url)


def canonical_ip(host: str) -> str | None:
    """The canonical text of an IP literal host (`0x7f.1` -> `127.0.0.1`, `[::1]` -> `::1`),
    or None when the host is a name or no host at all."""
    try:
        text, kind = weburl.parse_host(host)
    except WebUrlError:
        return None
    return text if kind in ("ipv4", "ipv6") else None


def canonical_host(raw: str) -> str:
    """Lower-case, IDNA (UTS #46) encoded, canonical IP text, no trailing dot; ValueError when
    it is no valid host. The same host parser as for URLs (percent-decoding included)."""
    host, _kind = weburl.parse_host(raw.strip())
    if not host:
        raise WebUrlError(f"invalid host {raw[:100]!r}")
    return host


# The rules look at the same few URLs many times per report, and a fleet sees the same hosts
# over and over: these pure string functions are memoised (bounded).
@lru_cache(maxsize=8192)
def normalize_url(url: str) -> str:
    """The result-cache and blocklist key of a URL.

    The browser's serialization (lower-case scheme and host, UTS #46 host, canonical IP text,
    no default port, dot segments resolved, '\\' as '/', spaces and non-ASCII percent-encoded)
    without the fragment, with the host's trailing dot dropped and %-escapes in upper case;
    userinfo, path and query are kept. Raises ValueError (with a clear message) only for input
    that is not an absolute URL with a host.
    """
    if not isinstance(url, str):
        raise WebUrlError(f"URL must be a string, not {type(url).__name__}")
    if not url.strip():
        raise WebUrlError("URL is empty")
    parsed = weburl.parse(url)
    if parsed.host_kind == "empty":
        raise WebUrlError(f"not an absolute URL with a host: {url[:100]!r}")
    return parsed.key()


@lru_cache(maxsize=8192)
def host_of(url: str | None) -> str | None:
    """The canonical host of a URL from the report, or None when there is none."""
    if not url:
        return None
    try:
        parsed = weburl.parse(url)
    except WebUrlError:
        return None
    return parsed.host or None


@cache
def _psl() -> PublicSuffixList:
    # Built once from the list bundled with the package (no network).
    return PublicSuffixList()


@lru_cache(maxsize=8192)
def registrable_domain(host: str) -> str:
    """The site a host belongs to: its registrable domain (eTLD+1), the IP itself for an IP
    literal, or the host itself when it has none (localhost, a bare public suffix)."""
    if ":" in host or canonical_ip(host) is not None:
        return host
    site = _psl().privatesuffix(host)
    return str(site) if site else host


@cache
def _icann_psl() -> PublicSuffixList:
    return PublicSuffixList(only_icann=True)


def is_registry_suffix(domain: str) -> bool:
    """A public suffix run by a registry (gov.uk, gouv.fr), not a platform's section of the list
    (github.io, myshopify.com, where anyone may get a name)."""
    return bool(_icann_psl().is_public(domain))


def site_of(url: str | None) -> str | None:
    host = host_of(url)
    return registrable_domain(host) if host else None
