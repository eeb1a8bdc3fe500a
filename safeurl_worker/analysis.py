"""Turn a fetcher report into a verdict: named rules, each contributing weighted signals.

Everything here is a pure function of (requested URL, report) except `Blocklist`, which reads one
file. The report is untrusted (it was produced next to hostile content), so every URL in it is
parsed defensively: a URL that does not parse simply contributes nothing, it never raises.

See docs/analysis.md for the rule table, the weights and the reasoning behind them.
"""

from __future__ import annotations

import contextlib
import encodings.idna
import ipaddress
import logging
import os
import re
import socket
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from functools import cache, lru_cache, partial
from types import MappingProxyType
from typing import NamedTuple
from urllib.parse import SplitResult, quote, unquote, urlsplit

from publicsuffixlist import PublicSuffixList

from .models import Analysis, Report, Signal, Verdict

log = logging.getLogger(__name__)

ANALYZER_VERSION = "1.0.0"

DEFAULT_SUSPICIOUS_THRESHOLD = 30
DEFAULT_MALICIOUS_THRESHOLD = 70
MAX_SCORE = 100
MAX_EVIDENCE = 300

MAX_SUBDOMAINS = 4  # labels before the registrable domain
MAX_URL_LENGTH = 200
MAX_HOST_LENGTH = 63  # the longest a single DNS label may be; a whole host that long is odd
OBFUSCATION_MIN_POINTS = 4  # below this a page merely uses one common API once
OBFUSCATION_MAX_WEIGHT = 30

TLS_ERROR_CODE = "TLS_ERROR"


class RuleInfo(NamedTuple):
    weight: int  # the weight of one signal; for scaled rules, the maximum
    description: str
    url_level: bool  # computable from URLs alone, without a successful fetch


RULES: Mapping[str, RuleInfo] = MappingProxyType({
    "blocklist_hit": RuleInfo(
        100, "The requested URL, a redirect hop or the final URL is on the blocklist "
        "(by domain, parent domain or exact normalized URL).", True),
    "ip_literal_host": RuleInfo(
        20, "The host is an IP address (including non-canonical IPv4 forms such as 0x7f.1) "
        "instead of a name.", True),
    "punycode_host": RuleInfo(
        15, "The host is an internationalized name (an xn-- label).", True),
    "mixed_script_host": RuleInfo(
        35, "A host label mixes letters from several Unicode scripts (e.g. Latin and Cyrillic): "
        "a homograph of another name.", True),
    "userinfo_in_url": RuleInfo(
        25, "The URL carries user:pass@ (or an @) in its authority, which hides the real host.",
        True),
    "excessive_subdomains": RuleInfo(
        15, f"More than {MAX_SUBDOMAINS} labels before the registrable domain.", True),
    "long_url": RuleInfo(10, f"The URL is longer than {MAX_URL_LENGTH} characters.", True),
    "long_host": RuleInfo(10, f"The host is longer than {MAX_HOST_LENGTH} characters.", True),
    "cross_domain_redirect": RuleInfo(
        15, "A redirect hop or the final URL is on another registrable domain.", False),
    "password_form_insecure": RuleInfo(
        35, "A password form on a plain-http page or submitting over plain http.", False),
    "password_form_cross_domain": RuleInfo(
        40, "A password form submits to another registrable domain than the page's "
        "(or to mailto:).", False),
    "executable_download": RuleInfo(
        40, "The response is a Windows/Android/Java executable or script "
        "(by content type, final URL path or Content-Disposition filename).", False),
    "archive_download": RuleInfo(
        15, "The response is an archive (zip, rar, 7z, tar, gzip).", False),
    "meta_refresh_cross_domain": RuleInfo(
        20, "A <meta http-equiv=refresh> points to another registrable domain.", False),
    "js_redirect_cross_domain": RuleInfo(
        20, "A script redirect points to another registrable domain.", False),
    "obfuscated_script": RuleInfo(
        OBFUSCATION_MAX_WEIGHT, "Inline scripts use eval/atob/unescape/fromCharCode/"
        "document.write or long base64 runs; weight scales with the markers, capped.", False),
    "hidden_iframe": RuleInfo(20, "The page embeds a hidden iframe.", False),
    "tls_error": RuleInfo(
        25, "The TLS certificate did not verify (or the fetch failed with TLS_ERROR).", False),
})

# --- URL helpers ----------------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21}
_LABEL_DOTS = re.compile("[.\u3002\uff0e\uff61]")  # the separators IDNA treats as dots
_ASCII_HOST = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
# What inet_aton would accept as IPv4 (1-4 parts, decimal/octal/hex) - browsers accept it too.
_LOOSE_IPV4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$")
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
_QUERY_SAFE = _PATH_SAFE + "?"
_PERCENT = re.compile(r"%[0-9a-fA-F]{2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _encode_label(label: str) -> str:
    """One host label to its ASCII (IDNA) form."""
    if label.isascii():
        return label.lower()
    try:  # nameprep + punycode, as a resolver would (also maps e.g. fullwidth letters)
        return encodings.idna.ToASCII(label).decode("ascii").lower()
    except UnicodeError:
        # Labels nameprep rejects still need a stable key; raw punycode keeps them distinct.
        return "xn--" + label.lower().encode("punycode").decode("ascii")


def _canonical_ip(host: str) -> str | None:
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


def _canonical_host(raw: str) -> str:
    """Lower-case, IDNA-encoded, canonical IP text; ValueError when it is no valid host."""
    # Browsers decode %-escapes in hosts, so %65vil.com must not slip past the blocklist.
    host = unquote(raw).strip().rstrip(".")
    if not host:
        raise ValueError("URL has no host")
    ip = _canonical_ip(host.lower())
    if ip is not None:
        return ip
    labels = _LABEL_DOTS.split(host)
    if any(not label for label in labels):
        raise ValueError(f"invalid host {raw[:100]!r}: empty label")
    ascii_host = ".".join(_encode_label(label) for label in labels)
    if not _ASCII_HOST.match(ascii_host):
        raise ValueError(f"invalid host {raw[:100]!r}: characters not allowed in a host name")
    return ascii_host


def _split(url: str) -> SplitResult:
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
    parts = _split(url)
    scheme = parts.scheme.lower()
    userinfo = parts.netloc.rpartition("@")[0]
    host = _canonical_host(parts.hostname or "")
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
def _host(url: str | None) -> str | None:
    """The canonical host of a URL from the report, or None when there is none."""
    if not url:
        return None
    try:
        parts = _split(url)
        return _canonical_host(parts.hostname or "")
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
    if _canonical_ip(host) is not None or ":" in host:
        return host
    site = _psl().privatesuffix(host)
    return str(site) if site else host


def _site(url: str | None) -> str | None:
    host = _host(url)
    return registrable_domain(host) if host else None


def _evidence(text: str) -> str:
    """Short, single-line, printable evidence: it holds attacker-controlled text."""
    clean = _CONTROL.sub("?", text)
    return clean if len(clean) <= MAX_EVIDENCE else clean[: MAX_EVIDENCE - 1] + "…"


def _signal(name: str, evidence: str, weight: int | None = None) -> Signal:
    w = RULES[name].weight if weight is None else weight
    return Signal(name=name, weight=w, evidence=_evidence(evidence))


def _short(url: str, limit: int = 120) -> str:
    return url if len(url) <= limit else url[: limit - 1] + "…"


def _page_url(url: str, report: Report) -> str:
    """The URL of the page the features were seen on."""
    return report.final_url or url


# --- URL-level rules (no fetch needed) ------------------------------------------------------


def ip_literal_host(url: str, report: Report) -> list[Signal]:
    """Legitimate sites use names; phishing kits on compromised/rented boxes often don't."""
    try:
        raw = (_split(url).hostname or "").rstrip(".")
    except ValueError:
        return []
    ip = _canonical_ip(raw)
    if ip is None:
        return []
    note = "" if raw == ip else f" (written as {raw!r})"
    return [_signal("ip_literal_host", f"host is the IP address {ip}{note}")]


def punycode_host(url: str, report: Report) -> list[Signal]:
    """IDNs are legitimate but rare for the brands phishing imitates; a light weight."""
    host = _host(url)
    if not host or not any(label.startswith("xn--") for label in host.split(".")):
        return []
    return [_signal("punycode_host", f"internationalized host {host} ({_unicode_host(host)})")]


def _unicode_host(host: str) -> str:
    return ".".join(_decode_label(label) for label in host.split("."))


def _decode_label(label: str) -> str:
    if not label.startswith("xn--"):
        return label
    try:
        return label[4:].encode("ascii").decode("punycode")
    except UnicodeError:
        return label


# Scripts that legitimately mix within one label (Japanese, Chinese, Korean text with Latin).
_CJK_WORDS = frozenset({"CJK", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA", "HANGUL",
                        "BOPOMOFO", "IDEOGRAPHIC"})
_COMPATIBLE = frozenset({"LATIN", "CJK"})


def _script(ch: str) -> str:
    """Approximate Unicode script of a letter: the first word of its name (LATIN, CYRILLIC…)."""
    word = unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0]
    return "CJK" if word in _CJK_WORDS else word


def _mixed_scripts(label: str) -> set[str]:
    scripts = {_script(ch) for ch in label if ch.isalpha()}
    if len(scripts) < 2 or scripts <= _COMPATIBLE:
        return set()
    return scripts


def mixed_script_host(url: str, report: Report) -> list[Signal]:
    """Latin 'a' next to Cyrillic U+0430 looks identical: the classic homograph attack."""
    host = _host(url)
    if not host:
        return []
    for label in host.split("."):
        unicode_label = _decode_label(label)
        scripts = _mixed_scripts(unicode_label)
        if scripts:
            return [_signal("mixed_script_host",
                            f"label {unicode_label!r} mixes {', '.join(sorted(scripts))}")]
    return []


def userinfo_in_url(url: str, report: Report) -> list[Signal]:
    """http://paypal.com@evil.example/ shows a trusted name while going elsewhere."""
    try:
        parts = _split(url)
    except ValueError:
        return []
    if "@" not in parts.netloc:
        return []
    userinfo = parts.netloc.rpartition("@")[0]
    return [_signal("userinfo_in_url",
                    f"authority carries {_short(userinfo, 60)!r}@ before host {parts.hostname}")]


def excessive_subdomains(url: str, report: Report) -> list[Signal]:
    """login.paypal.com.secure.account.evil.example buries the real domain at the end."""
    host = _host(url)
    if not host or _canonical_ip(host) is not None or ":" in host:
        return []
    site = registrable_domain(host)
    extra = host.count(".") - site.count(".")
    if extra <= MAX_SUBDOMAINS:
        return []
    return [_signal("excessive_subdomains", f"{extra} labels before {site} in {_short(host)}")]


def long_url(url: str, report: Report) -> list[Signal]:
    """Very long URLs push the real destination out of view and carry encoded payloads."""
    if len(url) <= MAX_URL_LENGTH:
        return []
    return [_signal("long_url", f"URL is {len(url)} characters long")]


def long_host(url: str, report: Report) -> list[Signal]:
    """Long hosts are typical of keyword-stuffed phishing names."""
    host = _host(url)
    if not host or len(host) <= MAX_HOST_LENGTH:
        return []
    return [_signal("long_host", f"host is {len(host)} characters long: {_short(host)}")]


def blocklist_hit(url: str, report: Report, blocklist: Blocklist | None) -> list[Signal]:
    """Operator-curated knowledge beats every heuristic: a hit alone is malicious."""
    if blocklist is None:
        return []
    candidates = [url, *(u for hop in report.redirects for u in (hop.url, hop.location))]
    if report.final_url:
        candidates.append(report.final_url)
    for candidate in dict.fromkeys(candidates):  # unique, in chain order
        entry = blocklist.match(candidate)
        if entry is not None:
            return [_signal("blocklist_hit",
                            f"{_short(candidate)} matches blocklist entry {entry!r}")]
    return []


# --- rules on what the fetch saw ------------------------------------------------------------


def cross_domain_redirect(url: str, report: Report) -> list[Signal]:
    """Redirectors and cloakers bounce victims to a domain the link did not show."""
    origin = _site(url)
    if origin is None:
        return []
    seen = [hop.location for hop in report.redirects]
    if report.final_url:
        seen.append(report.final_url)
    foreign = [s for s in dict.fromkeys(_site(u) for u in seen) if s and s != origin]
    if not foreign:
        return []
    return [_signal("cross_domain_redirect",
                    f"{origin} redirected to {', '.join(foreign[:5])}")]


def password_form_insecure(url: str, report: Report) -> list[Signal]:
    """Credentials over plain http are readable on the wire; real login pages use https."""
    page = _page_url(url, report)
    page_http = page.lower().startswith("http:")
    for form in report.features.forms:
        if not form.has_password:
            continue
        if page_http or form.action.lower().startswith("http:"):
            where = "on http page" if page_http else "submitting to"
            target = _short(page) if page_http else _short(form.action)
            return [_signal("password_form_insecure", f"password form {where} {target}")]
    return []


def password_form_cross_domain(url: str, report: Report) -> list[Signal]:
    """A login form whose credentials go to another site is how credential phishing works."""
    page_site = _site(_page_url(url, report))
    for form in report.features.forms:
        if not form.has_password:
            continue
        if form.action.lower().startswith("mailto:"):
            return [_signal("password_form_cross_domain",
                            f"password form submits by email: {_short(form.action)}")]
        target = _site(form.action)
        if target and page_site and target != page_site:
            return [_signal("password_form_cross_domain",
                            f"password form on {page_site} submits to {_short(form.action)}")]
    return []


_EXEC_TYPES = frozenset({
    "application/x-msdownload", "application/x-msdos-program",
    "application/vnd.microsoft.portable-executable", "application/x-dosexec",
    "application/x-ms-installer", "application/x-msi", "application/vnd.android.package-archive",
    "application/java-archive", "application/x-java-archive",
})
_ARCHIVE_TYPES = frozenset({
    "application/zip", "application/x-zip-compressed", "application/x-rar-compressed",
    "application/vnd.rar", "application/x-rar", "application/x-7z-compressed",
    "application/x-tar", "application/gzip", "application/x-gzip",
})
_GENERIC_TYPES = frozenset({"application/octet-stream", "binary/octet-stream",
                            "application/force-download", "application/download"})
_EXEC_EXTS = (".exe", ".scr", ".msi", ".bat", ".cmd", ".dll", ".apk", ".jar", ".ps1", ".vbs",
              ".hta")
_ARCHIVE_EXTS = (".zip", ".rar", ".7z", ".tar", ".gz", ".tgz")
_FILENAME = re.compile(r"""filename\*?\s*=\s*(?:[\w-]+'[\w-]*')?"?([^";]+)"?""", re.IGNORECASE)


def _header(report: Report, name: str) -> str | None:
    """Case-insensitive header lookup (the fetcher may keep the server's casing)."""
    for key, value in report.headers.items():
        if key.lower() == name:
            return value
    return None


def _download_names(url: str, report: Report) -> list[str]:
    """File names the response claims: final URL path and Content-Disposition filename."""
    names: list[str] = []
    with contextlib.suppress(ValueError):  # an unparsable final URL just has no file name
        names.append(unquote(_split(_page_url(url, report)).path).lower().rstrip("/"))
    disposition = _header(report, "content-disposition")
    if disposition:
        names += [unquote(m.strip()).lower() for m in _FILENAME.findall(disposition)]
    return names


def _download_kind(url: str, report: Report) -> tuple[str, str] | None:
    """('executable_download' | 'archive_download', evidence) or None."""
    ctype = (report.content_type or "").split(";", 1)[0].strip().lower()
    names = _download_names(url, report)
    exe_name = next((n for n in names if n.endswith(_EXEC_EXTS)), None)
    archive_name = next((n for n in names if n.endswith(_ARCHIVE_EXTS)), None)
    disposition = _header(report, "content-disposition") or ""
    # An executable file name only counts when the body is served as a file, not as a page.
    served_as_file = (ctype in _GENERIC_TYPES | _EXEC_TYPES | _ARCHIVE_TYPES or not ctype
                      or "attachment" in disposition.lower())
    if ctype in _EXEC_TYPES:
        named = f", {_short(exe_name)}" if exe_name else ""
        return "executable_download", f"content type {ctype}{named}"
    if exe_name and served_as_file:
        return "executable_download", f"executable file {_short(exe_name)} ({ctype or 'no type'})"
    if ctype in _ARCHIVE_TYPES:
        return "archive_download", f"content type {ctype}"
    if archive_name and served_as_file:
        return "archive_download", f"archive file {_short(archive_name)} ({ctype or 'no type'})"
    return None


def executable_download(url: str, report: Report) -> list[Signal]:
    """A link that drops a program is the malware delivery path; no page needs one."""
    kind = _download_kind(url, report)
    if kind is None or kind[0] != "executable_download":
        return []
    return [_signal("executable_download", kind[1])]


def archive_download(url: str, report: Report) -> list[Signal]:
    """Archives often wrap malware to dodge scanners, but are also common legitimately."""
    kind = _download_kind(url, report)
    if kind is None or kind[0] != "archive_download":
        return []
    return [_signal("archive_download", kind[1])]


def meta_refresh_cross_domain(url: str, report: Report) -> list[Signal]:
    """Meta refresh to another site is a cheap cloaking redirect that evades HTTP logs.
    Seen either as a hop the fetcher followed (kind "meta") or, when it did not follow it
    (a long delay), in the final page's features."""
    hops = [(h.url, h.location) for h in report.redirects if h.kind == "meta"]
    if report.features.meta_refresh:
        hops.append((_page_url(url, report), report.features.meta_refresh))
    for page, target in hops:
        page_site, target_site = _site(page), _site(target)
        if target_site and page_site and target_site != page_site:
            return [_signal("meta_refresh_cross_domain", f"meta refresh to {_short(target)}")]
    return []


def js_redirect_cross_domain(url: str, report: Report) -> list[Signal]:
    """Script redirects to another site are how cloakers send only real visitors onwards."""
    page_site = _site(_page_url(url, report))
    for target in report.features.js_redirects:
        target_site = _site(target)
        if target_site and page_site and target_site != page_site:
            return [_signal("js_redirect_cross_domain", f"script redirect to {_short(target)}")]
    return []


# Points per occurrence (each kind counted at most 3 times): decoders and dynamic code weigh
# more than document.write, which old but honest pages still use.
_OBFUSCATION_POINTS = (
    ("eval", "eval_count", 3),
    ("fromCharCode", "fromcharcode_count", 3),
    ("unescape", "unescape_count", 2),
    ("atob", "atob_count", 2),
    ("document.write", "document_write_count", 1),
    ("long base64 run", "long_base64_runs", 5),
)


def obfuscated_script(url: str, report: Report) -> list[Signal]:
    """Packed/encoded inline script hides what a page does; one marker is normal, many are not."""
    stats = report.features.scripts
    points = 0
    seen: list[str] = []
    for label, field, per in _OBFUSCATION_POINTS:
        count: int = getattr(stats, field)
        if count:
            points += per * min(count, 3)
            seen.append(f"{label} x{count}")
    if points < OBFUSCATION_MIN_POINTS:
        return []
    weight = min(OBFUSCATION_MAX_WEIGHT, points)
    return [_signal("obfuscated_script", "inline script markers: " + ", ".join(seen), weight)]


def hidden_iframe(url: str, report: Report) -> list[Signal]:
    """Invisible iframes load exploit kits or click fraud without the visitor seeing it."""
    hidden = [f.src for f in report.features.iframes if f.hidden]
    if not hidden:
        return []
    more = f" (+{len(hidden) - 1} more)" if len(hidden) > 1 else ""
    return [_signal("hidden_iframe", f"hidden iframe {_short(hidden[0])}{more}")]


def tls_error(url: str, report: Report) -> list[Signal]:
    """A certificate that does not verify is self-signed, expired or for another name."""
    if report.error is not None and report.error.code == TLS_ERROR_CODE:
        detail = report.error.message or (report.tls.error if report.tls else None) or ""
        return [_signal("tls_error", f"TLS error: {detail}".rstrip(": "))]
    if report.tls is not None and not report.tls.verified:
        return [_signal("tls_error", f"certificate not verified: {report.tls.error or ''}"
                        .rstrip(": "))]
    return []


RuleCheck = Callable[[str, Report], Iterable[Signal]]

# Every rule of RULES except blocklist_hit, which needs the blocklist (bound in analyze).
_CHECKS: Mapping[str, RuleCheck] = MappingProxyType({
    "ip_literal_host": ip_literal_host,
    "punycode_host": punycode_host,
    "mixed_script_host": mixed_script_host,
    "userinfo_in_url": userinfo_in_url,
    "excessive_subdomains": excessive_subdomains,
    "long_url": long_url,
    "long_host": long_host,
    "cross_domain_redirect": cross_domain_redirect,
    "password_form_insecure": password_form_insecure,
    "password_form_cross_domain": password_form_cross_domain,
    "executable_download": executable_download,
    "archive_download": archive_download,
    "meta_refresh_cross_domain": meta_refresh_cross_domain,
    "js_redirect_cross_domain": js_redirect_cross_domain,
    "obfuscated_script": obfuscated_script,
    "hidden_iframe": hidden_iframe,
    "tls_error": tls_error,
})


# --- scoring --------------------------------------------------------------------------------


def _classify(score: int, suspicious_threshold: int, malicious_threshold: int) -> Verdict:
    if score >= malicious_threshold:
        return Verdict.MALICIOUS
    if score >= suspicious_threshold:
        return Verdict.SUSPICIOUS
    return Verdict.SAFE


def _score(signals: Iterable[Signal]) -> int:
    return max(0, min(MAX_SCORE, sum(s.weight for s in signals)))


def _fetched(report: Report) -> bool:
    return not (report.error is not None and report.http_status is None)


def _run(name: str, check: RuleCheck, url: str, report: Report) -> list[Signal]:
    """One rule; a bug in one rule must not lose the whole verdict."""
    try:
        return list(check(url, report))
    except Exception:
        log.exception("analysis rule %s failed", name)
        return []


def analyze(url: str, report: Report, *, blocklist: Blocklist | None = None,
            suspicious_threshold: int = DEFAULT_SUSPICIOUS_THRESHOLD,
            malicious_threshold: int = DEFAULT_MALICIOUS_THRESHOLD) -> Analysis:
    """Score a report. `url` is the URL the job asked for (trusted, unlike report.requested_url).

    score = min(100, sum of signal weights); malicious at >= malicious_threshold, suspicious at
    >= suspicious_threshold, else safe. A target that could not be fetched is `unknown` unless the
    URL-level signals alone reach the suspicious threshold.
    """
    if not 1 <= suspicious_threshold < malicious_threshold <= MAX_SCORE:
        raise ValueError("thresholds must satisfy 1 <= suspicious < malicious <= 100")
    checks: dict[str, RuleCheck] = {"blocklist_hit": partial(blocklist_hit, blocklist=blocklist),
                                    **_CHECKS}
    signals = [s for name, check in checks.items() for s in _run(name, check, url, report)]
    score = _score(signals)
    verdict = _classify(score, suspicious_threshold, malicious_threshold)
    if not _fetched(report):
        url_score = _score(s for s in signals if RULES[s.name].url_level)
        if url_score < suspicious_threshold:
            verdict = Verdict.UNKNOWN
    return Analysis(verdict=verdict, score=score, signals=signals,
                    analyzer_version=ANALYZER_VERSION)


# --- blocklist ------------------------------------------------------------------------------


class _Entries(NamedTuple):
    domains: Mapping[str, str]  # canonical domain or IP -> entry as written
    urls: Mapping[str, str]  # normalized URL -> entry as written


_EMPTY = _Entries({}, {})


def _parse_entry(text: str) -> tuple[str, str] | None:
    """('domain' | 'url', key) for one entry, or None when it is not valid."""
    try:
        if "://" in text:
            return "url", normalize_url(text)
        domain = text.removeprefix("*.").lstrip(".")
        return "domain", _canonical_host(domain)
    except ValueError:
        return None


def _parse_blocklist(text: str, path: str) -> _Entries:
    domains: dict[str, str] = {}
    urls: dict[str, str] = {}
    invalid = 0
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry = line.split()[0]  # an entry has no spaces; anything after is a comment
        parsed = _parse_entry(entry)
        if parsed is None:
            invalid += 1
            continue
        kind, key = parsed
        (domains if kind == "domain" else urls).setdefault(key, entry)
    if invalid:
        log.warning("blocklist %s: ignored %d invalid entries", path, invalid)
    return _Entries(domains, urls)


class Blocklist:
    """Domains and URLs from a file, one a line; reloads itself when the file changes.

    A domain entry matches the domain and all its subdomains; a URL entry matches that
    normalized URL. `#` starts a comment line. A missing or unreadable file is an empty list
    (with a warning), never an error: the blocklist must not stop scanning.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *,
                 check_interval_s: float = 1.0) -> None:
        self.path = os.fspath(path) if path else None
        self.check_interval_s = check_interval_s
        self._entries = _EMPTY
        self._stamp: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) last loaded
        self._failed = False  # already warned about the current failure
        self._checked_at = -float("inf")
        self._lock = threading.Lock()  # the worker may analyze from several threads
        self.refresh(force=True)

    @property
    def entry_count(self) -> int:
        # Not __len__: an empty-but-configured blocklist must not be falsy to `if blocklist:`.
        return len(self._entries.domains) + len(self._entries.urls)

    def refresh(self, *, force: bool = False) -> None:
        """Reload if the file changed; stat at most once per check interval unless forced."""
        if self.path is None:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked_at < self.check_interval_s:
                return
            self._checked_at = now
            self._reload_if_changed(self.path)

    def _reload_if_changed(self, path: str) -> None:
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp and not self._failed:
                return
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError as exc:
            self._fail(path, exc)
            return
        self._entries = _parse_blocklist(text, path)
        self._stamp = stamp
        self._failed = False
        log.info("blocklist %s loaded: %d entries", path, self.entry_count)

    def _fail(self, path: str, exc: OSError) -> None:
        if not self._failed:  # once per failure, not once per second
            log.warning("blocklist %s unavailable, using an empty list: %s", path, exc)
        self._entries, self._stamp, self._failed = _EMPTY, None, True

    def match(self, url: str) -> str | None:
        """The entry (as written in the file) that blocks `url`, or None. Never raises."""
        self.refresh()
        entries = self._entries
        try:
            key = normalize_url(url)
        except ValueError:
            return None
        if key in entries.urls:
            return entries.urls[key]
        host = _host(key)
        if host is None:
            return None
        if _canonical_ip(host) is not None or ":" in host:
            return entries.domains.get(host)
        labels = host.split(".")
        for i in range(len(labels)):  # the host, then each parent domain
            entry = entries.domains.get(".".join(labels[i:]))
            if entry is not None:
                return entry
        return None
