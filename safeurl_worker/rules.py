"""The rules: each reads (requested URL, report) and returns weighted signals with evidence.

Pure functions; the report is untrusted, so a URL in it that does not parse contributes nothing.
See docs/analysis.md for the table of rules and the reasoning behind each weight.
"""

from __future__ import annotations

import contextlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import NamedTuple
from urllib.parse import unquote

from .blocklist import Blocklist
from .models import Report, Signal
from .urls import canonical_ip, host_of, registrable_domain, site_of, split_url

ANALYZER_VERSION = "1.0.0"

DEFAULT_SUSPICIOUS_THRESHOLD = 30
DEFAULT_MALICIOUS_THRESHOLD = 70
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
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
        raw = (split_url(url).hostname or "").rstrip(".")
    except ValueError:
        return []
    ip = canonical_ip(raw)
    if ip is None:
        return []
    note = "" if raw == ip else f" (written as {raw!r})"
    return [_signal("ip_literal_host", f"host is the IP address {ip}{note}")]


def punycode_host(url: str, report: Report) -> list[Signal]:
    """IDNs are legitimate but rare for the brands phishing imitates; a light weight."""
    host = host_of(url)
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
    host = host_of(url)
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
        parts = split_url(url)
    except ValueError:
        return []
    if "@" not in parts.netloc:
        return []
    userinfo = parts.netloc.rpartition("@")[0]
    return [_signal("userinfo_in_url",
                    f"authority carries {_short(userinfo, 60)!r}@ before host {parts.hostname}")]


def excessive_subdomains(url: str, report: Report) -> list[Signal]:
    """login.paypal.com.secure.account.evil.example buries the real domain at the end."""
    host = host_of(url)
    if not host or canonical_ip(host) is not None or ":" in host:
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
    host = host_of(url)
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
    origin = site_of(url)
    if origin is None:
        return []
    seen = [hop.location for hop in report.redirects]
    if report.final_url:
        seen.append(report.final_url)
    foreign = [s for s in dict.fromkeys(site_of(u) for u in seen) if s and s != origin]
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
    page_site = site_of(_page_url(url, report))
    for form in report.features.forms:
        if not form.has_password:
            continue
        if form.action.lower().startswith("mailto:"):
            return [_signal("password_form_cross_domain",
                            f"password form submits by email: {_short(form.action)}")]
        target = site_of(form.action)
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
        names.append(unquote(split_url(_page_url(url, report)).path).lower().rstrip("/"))
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
        page_site, target_site = site_of(page), site_of(target)
        if target_site and page_site and target_site != page_site:
            return [_signal("meta_refresh_cross_domain", f"meta refresh to {_short(target)}")]
    return []


def js_redirect_cross_domain(url: str, report: Report) -> list[Signal]:
    """Script redirects to another site are how cloakers send only real visitors onwards."""
    page_site = site_of(_page_url(url, report))
    for target in report.features.js_redirects:
        target_site = site_of(target)
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
