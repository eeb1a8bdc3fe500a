"""The rules: each reads a `Context` (requested URL, report, blocklist, brand catalogue) and
returns weighted signals with evidence.

One registry: `@rule(name, weight, description)` records a rule with its function, so the table
(`RULES`) and what runs cannot drift apart. Pure functions; the report is untrusted, so a URL in
it that does not parse contributes nothing. See docs/analysis.md for the table of rules and the
reasoning behind each weight.
"""

from __future__ import annotations

import contextlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from types import MappingProxyType
from typing import NamedTuple
from urllib.parse import unquote

from .blocklist import Blocklist
from .brands import Catalogue, Claim, Lookalike
from .models import Form, Render, Report, Signal
from .urls import canonical_ip, host_of, parse_url, raw_host, registrable_domain, site_of

ANALYZER_VERSION = "2.1.0"

DEFAULT_SUSPICIOUS_THRESHOLD = 30
DEFAULT_MALICIOUS_THRESHOLD = 70
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_SCORE = 100
MAX_EVIDENCE = 300

MAX_SUBDOMAINS = 4  # labels before the registrable domain
MAX_URL_LENGTH = 200
MAX_HOST_LENGTH = 63  # the longest a single DNS label may be; a whole host that long is odd
OBFUSCATION_MIN_POINTS = 4  # below this a page merely uses one common API once
OBFUSCATION_MIN_POINTS_WITH_ADS = 12  # ad tags bring their own eval/document.write/atob
OBFUSCATION_MAX_WEIGHT = 30

BRAND_WEIGHT = 40  # the page presents itself as a brand on a domain that is not the brand's
BRAND_EMAIL_WEIGHT = 60  # ... and asks for the account's e-mail address
BRAND_CREDENTIALS_WEIGHT = 75  # ... and asks for a password, card or one-time code
INSECURE_PAGE_WEIGHT = 15  # password form on an http page that submits over https
AFFILIATED_FORM_WEIGHT = 15  # password form posting to a site the page uses otherwise too

# Look-alike kinds (brands.Lookalike.kind) and their weights.
LOOKALIKE_WEIGHTS: Mapping[str, int] = MappingProxyType({
    "brand_domain_in_host": 45,  # paypal.com-resolution-center.info
    "homoglyph": 45,  # p\u0430ypal.com (a Cyrillic a)
    "brand_in_domain": 30,  # amazon-order-verify.com
    "brand_in_subdomain": 30,  # paypal.secure-login.example
    "typosquat": 25,  # paypa1.com, gooogle.com
    "brand_domain_in_path": 15,  # host.example/www.paypal.com/signin
})
# A brand's domain inside a foreign host, or a homoglyph of it, has no honest use: such a host
# asking for credentials is phishing on its own.
LOOKALIKE_CREDENTIALS_WEIGHT = 75
_UNAMBIGUOUS_LOOKALIKES = frozenset({"brand_domain_in_host", "homoglyph"})

TLS_ERROR_CODE = "TLS_ERROR"
_PORT_REFUSAL = re.compile(r"(?:^|: )port \d+ is not in the allowed ports")
BLOCKED_TARGET_CODE = "BLOCKED_TARGET"

# Ad, analytics, consent and social-widget services (registrable domains, or hosts where the
# domain also serves other things). Their tags are packed script and invisible iframes by
# design; a page that carries them is an ordinary ad-funded page, not an obfuscated one. An
# attacker can add one of these tags too: it only lowers, never removes, obfuscation scoring.
# The list is data: safeurl_worker/data/ad_hosts.txt.
AD_HOSTS = frozenset(
    line.strip() for line in resources.files("safeurl_worker").joinpath("data", "ad_hosts.txt")
    .read_text("utf-8").splitlines() if line.strip() and not line.startswith("#"))


class Rule(NamedTuple):
    weight: int  # the weight of one signal; for scaled rules, the maximum
    description: str
    url_level: bool  # counts when the fetch failed: computable from URLs and the fetch outcome
    check: Callable[[Context], Iterable[Signal]]


_REGISTRY: dict[str, Rule] = {}
RULES: Mapping[str, Rule] = MappingProxyType(_REGISTRY)

Check = Callable[["Context"], Iterable[Signal]]


def rule(name: str, weight: int, description: str, *, url_level: bool = False
         ) -> Callable[[Check], Check]:
    """Register a rule: its name, weight, description and check, in one place."""
    def register(check: Check) -> Check:
        if name in _REGISTRY:
            raise ValueError(f"rule {name} registered twice")
        _REGISTRY[name] = Rule(weight, description, url_level, check)
        return check
    return register


@dataclass
class Context:
    """What every rule reads. Derived values are computed once per report."""

    url: str  # the URL the job asked for (trusted, unlike report.requested_url)
    report: Report
    blocklist: Blocklist | None
    catalogue: Catalogue
    # A render scan: the static fetch of the same URL, when it ran and produced a report (the
    # render rules compare what a browser saw with what the HTML alone shows).
    static: Report | None = None

    @cached_property
    def page_url(self) -> str:
        """The URL of the page the features were seen on."""
        return self.report.final_url or self.url

    @cached_property
    def page_site(self) -> str | None:
        return site_of(self.page_url)

    @cached_property
    def claims(self) -> list[Claim]:
        """Brands the page presents itself as while it is not on their domains."""
        host = host_of(self.page_url)
        if host is None:
            return []
        return [c for c in self.catalogue.presented(self.report, ad_hosts=AD_HOSTS)
                if not c.brand.software and not self.catalogue.owns(c.brand, host)]

    @cached_property
    def ad_code(self) -> bool:
        """The page carries ad/analytics tags (scripts or iframes from AD_HOSTS)."""
        f = self.report.features
        return any(is_ad_host(u) for u in [*f.external_scripts, *(i.src for i in f.iframes)])


def is_ad_host(url: str) -> bool:
    host = host_of(url)
    return host is not None and (host in AD_HOSTS or registrable_domain(host) in AD_HOSTS
                                 or any(host.endswith("." + h) for h in AD_HOSTS))


def _evidence(text: str) -> str:
    """Short, single-line, printable evidence: it holds attacker-controlled text."""
    clean = _CONTROL.sub("?", text)
    return clean if len(clean) <= MAX_EVIDENCE else clean[: MAX_EVIDENCE - 1] + "…"


def _signal(name: str, evidence: str, weight: int | None = None) -> Signal:
    w = RULES[name].weight if weight is None else weight
    return Signal(name=name, weight=w, evidence=_evidence(evidence))


def _short(url: str, limit: int = 120) -> str:
    return url if len(url) <= limit else url[: limit - 1] + "…"


# --- URL-level rules (no fetch needed) ------------------------------------------------------


@rule("blocklist_hit", 100, "The requested URL, a redirect hop or the final URL is on the "
      "blocklist (by domain, parent domain or exact normalized URL).", url_level=True)
def blocklist_hit(ctx: Context) -> list[Signal]:
    """Operator-curated knowledge beats every heuristic: a hit alone is malicious."""
    if ctx.blocklist is None:
        return []
    report = ctx.report
    candidates = [ctx.url, *(u for hop in report.redirects for u in (hop.url, hop.location))]
    if report.final_url:
        candidates.append(report.final_url)
    for candidate in dict.fromkeys(candidates):  # unique, in chain order
        entry = ctx.blocklist.match(candidate)
        if entry is not None:
            return [_signal("blocklist_hit",
                            f"{_short(candidate)} matches blocklist entry {entry!r}")]
    return []


@rule("ip_literal_host", 20, "The host is an IP address (including non-canonical IPv4 forms "
      "such as 0x7f.1) instead of a name.", url_level=True)
def ip_literal_host(ctx: Context) -> list[Signal]:
    """Legitimate sites use names; phishing kits on compromised/rented boxes often don't."""
    try:
        parsed = parse_url(ctx.url)
    except ValueError:
        return []
    if parsed.ip is None:
        return []
    raw = (raw_host(ctx.url) or parsed.host).rstrip(".")  # as written, for the evidence
    note = "" if raw.lower().strip("[]") == parsed.host else f" (written as {raw[:60]!r})"
    return [_signal("ip_literal_host", f"host is the IP address {parsed.host}{note}")]


@rule("punycode_host", 15, "The host is an internationalized name (an xn-- label).",
      url_level=True)
def punycode_host(ctx: Context) -> list[Signal]:
    """IDNs are legitimate but rare for the brands phishing imitates; a light weight."""
    host = host_of(ctx.url)
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


@rule("mixed_script_host", 35, "A host label mixes letters from several Unicode scripts "
      "(e.g. Latin and Cyrillic): a homograph of another name.", url_level=True)
def mixed_script_host(ctx: Context) -> list[Signal]:
    """Latin 'a' next to Cyrillic U+0430 looks identical: the classic homograph attack."""
    host = host_of(ctx.url)
    if not host:
        return []
    for label in host.split("."):
        unicode_label = _decode_label(label)
        scripts = _mixed_scripts(unicode_label)
        if scripts:
            return [_signal("mixed_script_host",
                            f"label {unicode_label!r} mixes {', '.join(sorted(scripts))}")]
    return []


@rule("userinfo_in_url", 25, "The URL carries a user name or password (user:pass@, user@) in "
      "its authority, which hides the real host.", url_level=True)
def userinfo_in_url(ctx: Context) -> list[Signal]:
    """http://paypal.com@evil.example/ shows a trusted name while going elsewhere."""
    try:  # the browser's split: `http://a.example\\@b.example/` has no userinfo (host a.example)
        parsed = parse_url(ctx.url)
    except ValueError:
        return []
    if not parsed.has_userinfo:
        return []
    return [_signal("userinfo_in_url", f"authority carries {_short(parsed.userinfo, 60)!r}@ "
                    f"before host {parsed.host}")]


@rule("excessive_subdomains", 15, f"More than {MAX_SUBDOMAINS} labels before the registrable "
      "domain.", url_level=True)
def excessive_subdomains(ctx: Context) -> list[Signal]:
    """login.paypal.com.secure.account.evil.example buries the real domain at the end."""
    host = host_of(ctx.url)
    if not host or canonical_ip(host) is not None or ":" in host:
        return []
    site = registrable_domain(host)
    extra = host.count(".") - site.count(".")
    if extra <= MAX_SUBDOMAINS:
        return []
    return [_signal("excessive_subdomains", f"{extra} labels before {site} in {_short(host)}")]


@rule("long_url", 10, f"The URL is longer than {MAX_URL_LENGTH} characters.", url_level=True)
def long_url(ctx: Context) -> list[Signal]:
    """Very long URLs push the real destination out of view and carry encoded payloads."""
    if len(ctx.url) <= MAX_URL_LENGTH:
        return []
    return [_signal("long_url", f"URL is {len(ctx.url)} characters long")]


@rule("long_host", 10, f"The host is longer than {MAX_HOST_LENGTH} characters.", url_level=True)
def long_host(ctx: Context) -> list[Signal]:
    """Long hosts are typical of keyword-stuffed phishing names."""
    host = host_of(ctx.url)
    if not host or len(host) <= MAX_HOST_LENGTH:
        return []
    return [_signal("long_host", f"host is {len(host)} characters long: {_short(host)}")]


@rule("lookalike_domain", LOOKALIKE_CREDENTIALS_WEIGHT,
      "The requested or final host imitates a catalogue brand it does not belong to: the "
      "brand's domain inside the host, its name in the domain or a subdomain, a homoglyph or "
      "a typosquat of it, or its domain in the path; the weight depends on the kind, and is "
      f"{LOOKALIKE_CREDENTIALS_WEIGHT} when a brand-domain or homoglyph host asks for "
      "credentials.", url_level=True)
def lookalike_domain(ctx: Context) -> list[Signal]:
    """paypal.com-resolution-center.info: the brand's name where the victim looks for it."""
    found: Lookalike | None = None
    for url in dict.fromkeys([ctx.url, ctx.page_url]):
        hit = ctx.catalogue.lookalike(url)
        if hit and (found is None or LOOKALIKE_WEIGHTS[hit.kind] > LOOKALIKE_WEIGHTS[found.kind]):
            found = hit
    if found is None:
        return []
    weight, asks = LOOKALIKE_WEIGHTS[found.kind], ""
    asked = _credential_kind(ctx.report.features.forms)
    if asked and found.kind in _UNAMBIGUOUS_LOOKALIKES:
        weight, asks = LOOKALIKE_CREDENTIALS_WEIGHT, f", asks for {asked}"
    return [_signal("lookalike_domain",
                    f"{found.kind.replace('_', ' ')} ({found.brand.name}): {found.detail}{asks}",
                    weight)]


@rule("redirect_to_blocked_target", 80, "A redirect (HTTP or meta refresh) from the public "
      "target led to an internal, metadata or otherwise refused address; the fetcher refused "
      "the hop (BLOCKED_TARGET after at least one redirect).", url_level=True)
def redirect_to_blocked_target(ctx: Context) -> list[Signal]:
    """A public page that sends its visitor to 169.254.169.254 or 10.x is probing the
    scanner's network (SSRF): the refused hop is the evidence."""
    report = ctx.report
    if report.error is None or report.error.code != BLOCKED_TARGET_CODE or not report.redirects:
        return []
    # A port outside FETCH_ALLOWED_PORTS is our policy, not the page's doing: a webmail that
    # redirects to :2096 is not probing anything (netcheck words that refusal "port N ...";
    # the browser image puts the refused URL first: "URL: port N ...").
    if _PORT_REFUSAL.search(report.error.message):
        return []
    hop = report.redirects[-1]
    return [_signal("redirect_to_blocked_target",
                    f"{_short(hop.url)} redirected ({hop.kind}) to refused {_short(hop.location)}")]


# --- rules on what the fetch saw ------------------------------------------------------------


def _credential_kind(forms: Iterable[Form]) -> str | None:
    """'password' / 'card' / 'one-time code' / 'e-mail' for the strongest thing asked for."""
    forms = list(forms)
    asked = [("password", any(f.has_password for f in forms)),
             ("card", any(f.has_card for f in forms)),
             ("one-time code", any(f.has_otp for f in forms)),
             ("e-mail", any(f.has_email for f in forms))]
    return next((label for label, found in asked if found), None)


# Account-threat language: how lures push a victim on ("Your account is on hold").
_LURE = re.compile(
    r"\b(?:suspend(?:ed)?|on hold|(?:un)?lock(?:ed)?|restricted|limited access|"
    r"security (?:alert|notice|check|code)|unusual (?:sign[- ]in )?activity|important notice|"
    r"action required|verify|verification|confirm (?:your|it)|re-?enter|expire[sd]?|"
    r"update (?:your )?(?:payment|billing|card|account|details)|payment (?:declined|failed)|"
    r"customs fee|parcel (?:is )?on hold)\b", re.IGNORECASE)


def _lure(report: Report) -> str | None:
    f = report.features
    for text in (report.title, f.meta.og_title, *f.headings[:5], f.text[:2000]):
        m = _LURE.search(text or "")
        if m:
            return m.group(0)
    return None


def _script_written(report: Report) -> bool:
    """The page writes its content from an encoded string (document.write of atob/unescape/
    fromCharCode/base64): what a scanner without JavaScript sees is not what a victim sees."""
    s = report.features.scripts
    decoders = s.atob_count + s.unescape_count + s.fromcharcode_count + s.long_base64_runs
    return s.document_write_count > 0 and decoders > 0


def _impersonation_weight(report: Report) -> tuple[int, str]:
    asked = _credential_kind(report.features.forms)
    if asked and asked != "e-mail":
        return BRAND_CREDENTIALS_WEIGHT, f"asks for {asked}"
    lure = _lure(report)
    if lure:
        return BRAND_CREDENTIALS_WEIGHT, f"account-threat language {lure!r}"
    if _script_written(report):
        return BRAND_CREDENTIALS_WEIGHT, "writes its content from encoded script"
    if asked:
        return BRAND_EMAIL_WEIGHT, f"asks for {asked}"
    return BRAND_WEIGHT, "no form"


@rule("brand_impersonation", BRAND_CREDENTIALS_WEIGHT,
      "The page presents itself as a catalogue brand (site name, title, canonical URL, icon, "
      "logo, copyright, form text, assets from the brand's hosts) on a domain that is not the "
      f"brand's. {BRAND_WEIGHT} alone, {BRAND_EMAIL_WEIGHT} when it asks for an e-mail address, "
      f"{BRAND_CREDENTIALS_WEIGHT} when it asks for a password, card number or one-time code, "
      "uses account-threat language, or writes its content from encoded script.")
def brand_impersonation(ctx: Context) -> list[Signal]:
    """A brand's sign-in page anywhere but at the brand is the definition of phishing; so is
    its "your account is on hold" lure, and its form hidden in encoded script."""
    if not ctx.claims:
        return []
    claim = ctx.claims[0]
    weight, why = _impersonation_weight(ctx.report)
    return [_signal("brand_impersonation",
                    f"presents itself as {claim.brand.name} on {ctx.page_site} ({why}): "
                    f"{claim.summary()}", weight)]


@rule("cross_domain_redirect", 15, "A redirect hop or the final URL is on another registrable "
      "domain.")
def cross_domain_redirect(ctx: Context) -> list[Signal]:
    """Redirectors and cloakers bounce victims to a domain the link did not show."""
    origin = site_of(ctx.url)
    if origin is None:
        return []
    seen = [hop.location for hop in ctx.report.redirects]
    if ctx.report.final_url:
        seen.append(ctx.report.final_url)
    foreign = [s for s in dict.fromkeys(site_of(u) for u in seen) if s and s != origin]
    if not foreign:
        return []
    return [_signal("cross_domain_redirect",
                    f"{origin} redirected to {', '.join(foreign[:5])}")]


@rule("password_form_insecure", 35, "A password form submitting over plain http (35), or on a "
      f"plain-http page while submitting over https ({INSECURE_PAGE_WEIGHT}).")
def password_form_insecure(ctx: Context) -> list[Signal]:
    """Credentials sent over plain http are readable on the wire: no honest login does that.
    A login box on an http page that posts to https (old news sites) is weaker evidence."""
    page_http = ctx.page_url.lower().startswith("http:")
    weak: Signal | None = None
    for form in ctx.report.features.forms:
        if not form.has_password:
            continue
        action_http = form.action.lower().startswith("http:")
        if action_http:
            where = "on http page" if page_http else "on https page"
            return [_signal("password_form_insecure",
                            f"password form {where} submits to {_short(form.action)}")]
        if page_http and weak is None:
            weak = _signal("password_form_insecure",
                           f"password form on http page {_short(ctx.page_url)} "
                           f"(submits over https)", INSECURE_PAGE_WEIGHT)
    return [weak] if weak else []


@rule("password_form_cross_domain", 40, "A password form submits to another organisation than "
      "the page's (another registrable domain that is neither the same catalogue brand nor an "
      "identity provider), or to mailto:; "
      f"{AFFILIATED_FORM_WEIGHT} when the page's other forms or assets use that site too.")
def password_form_cross_domain(ctx: Context) -> list[Signal]:
    """A login form whose credentials go to another site is how credential phishing works;
    a publisher's login posting to its own sign-in domain or to Okta is not."""
    page_host = host_of(ctx.page_url)
    for form in ctx.report.features.forms:
        if not form.has_password:
            continue
        if form.action.lower().startswith("mailto:"):
            return [_signal("password_form_cross_domain",
                            f"password form submits by email: {_short(form.action)}")]
        target = host_of(form.action)
        if target and page_host and not ctx.catalogue.same_organisation(page_host, target):
            if _affiliated(ctx, target):
                return [_signal("password_form_cross_domain",
                                f"password form on {ctx.page_site} submits to "
                                f"{_short(form.action)}, a site the page also uses for its "
                                "other forms or assets", AFFILIATED_FORM_WEIGHT)]
            return [_signal("password_form_cross_domain",
                            f"password form on {ctx.page_site} submits to "
                            f"{_short(form.action)}")]
    return []


def _affiliated(ctx: Context, target_host: str) -> bool:
    """The page also sends its other forms to, or loads its own styles from, the target's
    site: a publisher and its sign-in service, not a collector. Images and scripts do not
    count: one tracking pixel or script tag from the collector costs a kit nothing."""
    site = registrable_domain(target_host)
    f = ctx.report.features
    others = [x.action for x in f.forms if not x.has_password]
    others += f.stylesheets
    return any(site_of(u) == site for u in others)


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


def _download_names(ctx: Context) -> list[str]:
    """File names the response claims: final URL path and Content-Disposition filename."""
    names: list[str] = []
    with contextlib.suppress(ValueError):  # an unparsable final URL just has no file name
        names.append(unquote(parse_url(ctx.page_url).pathname).lower().rstrip("/"))
    disposition = _header(ctx.report, "content-disposition")
    if disposition:
        names += [unquote(m.strip()).lower() for m in _FILENAME.findall(disposition)]
    return names


def _download_kind(ctx: Context) -> tuple[str, str] | None:
    """('executable_download' | 'archive_download', evidence) or None."""
    ctype = (ctx.report.content_type or "").split(";", 1)[0].strip().lower()
    names = _download_names(ctx)
    exe_name = next((n for n in names if n.endswith(_EXEC_EXTS)), None)
    archive_name = next((n for n in names if n.endswith(_ARCHIVE_EXTS)), None)
    disposition = _header(ctx.report, "content-disposition") or ""
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


@rule("executable_download", 40, "The response is a Windows/Android/Java executable or script "
      "(by content type, final URL path or Content-Disposition filename).")
def executable_download(ctx: Context) -> list[Signal]:
    """A link that drops a program is the malware delivery path; no page needs one."""
    kind = _download_kind(ctx)
    if kind is None or kind[0] != "executable_download":
        return []
    return [_signal("executable_download", kind[1])]


@rule("archive_download", 15, "The response is an archive (zip, rar, 7z, tar, gzip).")
def archive_download(ctx: Context) -> list[Signal]:
    """Archives often wrap malware to dodge scanners, but are also common legitimately."""
    kind = _download_kind(ctx)
    if kind is None or kind[0] != "archive_download":
        return []
    return [_signal("archive_download", kind[1])]


@rule("meta_refresh_cross_domain", 20, "A <meta http-equiv=refresh> points to another "
      "registrable domain.")
def meta_refresh_cross_domain(ctx: Context) -> list[Signal]:
    """Meta refresh to another site is a cheap cloaking redirect that evades HTTP logs.
    Seen either as a hop the fetcher followed (kind "meta") or, when it did not follow it
    (a long delay), in the final page's features."""
    hops = [(h.url, h.location) for h in ctx.report.redirects if h.kind == "meta"]
    if ctx.report.features.meta_refresh:
        hops.append((ctx.page_url, ctx.report.features.meta_refresh))
    for page, target in hops:
        page_site, target_site = site_of(page), site_of(target)
        if target_site and page_site and target_site != page_site:
            return [_signal("meta_refresh_cross_domain", f"meta refresh to {_short(target)}")]
    return []


@rule("js_redirect_cross_domain", 20, "A script redirect points to another registrable domain "
      "(not the same catalogue brand).")
def js_redirect_cross_domain(ctx: Context) -> list[Signal]:
    """Script redirects to another site are how cloakers send only real visitors onwards."""
    page_host = host_of(ctx.page_url)
    for target in ctx.report.features.js_redirects:
        target_host = host_of(target)
        if target_host and page_host and \
                not ctx.catalogue.same_organisation(page_host, target_host):
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


@rule("obfuscated_script", OBFUSCATION_MAX_WEIGHT, "Inline scripts use eval/atob/unescape/"
      "fromCharCode/document.write or long base64 runs; weight scales with the markers, capped; "
      "on a page carrying ad/analytics tags it needs more markers and counts half.")
def obfuscated_script(ctx: Context) -> list[Signal]:
    """Packed/encoded inline script hides what a page does; one marker is normal, many are not.
    Ad and analytics snippets use the same calls, so with their tags on the page the bar is
    higher and the weight halved."""
    stats = ctx.report.features.scripts
    points = 0
    seen: list[str] = []
    for label, field, per in _OBFUSCATION_POINTS:
        count: int = getattr(stats, field)
        if count:
            points += per * min(count, 3)
            seen.append(f"{label} x{count}")
    ads = ctx.ad_code
    if points < (OBFUSCATION_MIN_POINTS_WITH_ADS if ads else OBFUSCATION_MIN_POINTS):
        return []
    weight = min(OBFUSCATION_MAX_WEIGHT, points) // (2 if ads else 1)
    note = " (page carries ad/analytics tags: half weight)" if ads else ""
    return [_signal("obfuscated_script", "inline script markers: " + ", ".join(seen) + note,
                    weight)]


@rule("hidden_iframe", 20, "The page embeds a hidden iframe from another site that is not an "
      "ad/analytics service.")
def hidden_iframe(ctx: Context) -> list[Signal]:
    """Invisible iframes load exploit kits or click fraud without the visitor seeing it. Tag
    managers and ad slots hide theirs by design, and a same-site frame loads nothing new."""
    hidden = [f.src for f in ctx.report.features.iframes if f.hidden and _foreign_frame(ctx, f.src)]
    if not hidden:
        return []
    more = f" (+{len(hidden) - 1} more)" if len(hidden) > 1 else ""
    return [_signal("hidden_iframe", f"hidden iframe {_short(hidden[0])}{more}")]


def _foreign_frame(ctx: Context, src: str) -> bool:
    site = site_of(src)
    if site is None:  # about:blank, javascript:, unparsable: loads nothing from anywhere
        return False
    return site != ctx.page_site and not is_ad_host(src)


@rule("tls_error", 25, "The TLS certificate did not verify (or the fetch failed with "
      "TLS_ERROR).")
def tls_error(ctx: Context) -> list[Signal]:
    """A certificate that does not verify is self-signed, expired or for another name."""
    report = ctx.report
    if report.error is not None and report.error.code == TLS_ERROR_CODE:
        detail = report.error.message or (report.tls.error if report.tls else None) or ""
        return [_signal("tls_error", f"TLS error: {detail}".rstrip(": "))]
    if report.tls is not None and not report.tls.verified:
        return [_signal("tls_error", f"certificate not verified: {report.tls.error or ''}"
                        .rstrip(": "))]
    return []


# --- rules on what a browser saw (render scans: report.render) ------------------------------
# Each reads `report.render` (and `ctx.static`, the static fetch of the same URL) and fires only
# on render scans. Ad, analytics and widget hosts never count: their requests are normal.

_CREDENTIAL_KINDS = ("password", "card", "one-time code")
_KIT_TYPES = frozenset({"script", "stylesheet", "font", "xhr", "fetch"})
_WORDS = re.compile(r"[^\W_]{2,}", re.UNICODE)
CLOAKING_MIN_STATIC_TEXT = 200  # a static shell shorter than this is an SPA's, not a decoy
CLOAKING_MAX_OVERLAP = 0.2


def _asks_credentials(report: Report) -> str | None:
    asked = _credential_kind(report.features.forms)
    return asked if asked in _CREDENTIAL_KINDS else None


def _same_page(ctx: Context) -> bool:
    """The browser ended on the page the static fetch saw (same site): comparing them means
    something; after a script redirect elsewhere the redirect rules speak instead."""
    static = ctx.static
    if static is None or static.http_status is None:
        return False
    return site_of(static.final_url or ctx.url) == ctx.page_site


@rule("script_built_form", 20, "Render scans: the page the browser rendered asks for a "
      "password, card or one-time code in a form the static HTML of the same page lacks (built "
      "by script).")
def script_built_form(ctx: Context) -> list[Signal]:
    """A kit that writes its form from script hides it from every scanner that does not run
    JavaScript. Single-page apps build honest login forms the same way, so alone it only
    supports other signals (the form rules read the rendered form too)."""
    if ctx.report.render is None or not _same_page(ctx) or ctx.static is None:
        return []
    asked = _asks_credentials(ctx.report)
    if asked is None or _credential_kind(ctx.static.features.forms) == asked:
        return []
    form = next(f for f in ctx.report.features.forms
                if (f.has_password, f.has_card, f.has_otp) != (False, False, False))
    return [_signal("script_built_form", f"a form asking for {asked} (submits to "
                    f"{_short(form.action)}) exists only after scripts ran")]


@rule("script_redirect_cross_domain", 10, "Render scans: the browser was sent to another "
      "organisation's site by script (the navigation chain's `script` hops).")
def script_redirect_cross_domain(ctx: Context) -> list[Signal]:
    """The redirect a static fetch can only guess at from script text, seen happening. Like
    cross_domain_redirect (which also counts where the browser ended) it supports others."""
    render = ctx.report.render
    if render is None:
        return []
    for hop in render.navigation:
        src, dst = host_of(hop.url), host_of(hop.location)
        if hop.kind == "script" and src and dst and \
                not ctx.catalogue.same_organisation(src, dst):
            return [_signal("script_redirect_cross_domain",
                            f"script sent {_short(hop.url)} to {_short(hop.location)}")]
    return []


def _kit_requests(ctx: Context, render: Render) -> Iterable[tuple[str, str]]:
    """(why, url) of sub-resources a kit loads from elsewhere: code or styles from a bare IP
    address, or data sent by script (non-GET xhr/fetch) to another organisation."""
    page_host = host_of(ctx.page_url)
    for r in render.requests:
        host = host_of(r.url)
        if r.navigation or r.refused or r.type not in _KIT_TYPES or not host or not page_host \
                or is_ad_host(r.url) or ctx.catalogue.same_organisation(page_host, host):
            continue
        if canonical_ip(host) is not None or ":" in host:
            yield f"{r.type} from the IP address {host}", r.url
        elif r.type in ("xhr", "fetch") and r.method.upper() not in ("GET", "HEAD", "OPTIONS"):
            yield f"script sent a {r.method.upper()} to {registrable_domain(host)}", r.url


@rule("kit_resources_cross_host", 15, "Render scans: the page loaded script, styles or fonts "
      "from a bare IP address, or its script sent data (a non-GET request) to another "
      "organisation that is not an ad/analytics service.")
def kit_resources_cross_host(ctx: Context) -> list[Signal]:
    """A kit pulls its code from the server it was dropped on and posts what it collects from
    script, where no form action shows it. CDNs (names, GETs) and analytics do not count."""
    render = ctx.report.render
    if render is None:
        return []
    found = list(_kit_requests(ctx, render))
    if not found:
        return []
    more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
    return [_signal("kit_resources_cross_host", f"{found[0][0]}: {_short(found[0][1])}{more}")]


@rule("brand_assets_hotlinked", 20, "Render scans: a page asking for credentials on a site "
      "that is not the brand's loaded images or styles from a catalogue brand's own hosts "
      "(the request log: CSS backgrounds and script-inserted logos included).")
def brand_assets_hotlinked(ctx: Context) -> list[Signal]:
    """A clone hot-links the original's logo and styles; a page that merely embeds a video or
    a web font asks for no credentials, and ad hosts never count."""
    render, page_host = ctx.report.render, host_of(ctx.page_url)
    if render is None or page_host is None or _asks_credentials(ctx.report) is None:
        return []
    for r in render.requests:
        host = host_of(r.url)
        if r.type not in ("image", "stylesheet") or not host or is_ad_host(r.url):
            continue
        for brand in ctx.catalogue.owners(host):
            if not brand.software and not ctx.catalogue.owns(brand, page_host):
                return [_signal("brand_assets_hotlinked",
                                f"{r.type} from {brand.name}'s host {host} on {ctx.page_site}, "
                                f"which asks for {_asks_credentials(ctx.report)}")]
    return []


@rule("refused_subrequest", 40, "Render scans: the page made the browser request an internal, "
      "loopback, link-local or metadata address (an image, script, frame, WebSocket...); the "
      "egress proxy refused it and it was never sent.")
def refused_subrequest(ctx: Context) -> list[Signal]:
    """A public page reaching into the visitor's network (router pages, metadata, intranet
    hosts) is probing it: the refusal is the evidence. A port we do not fetch is our policy,
    not the page's doing."""
    render = ctx.report.render
    if render is None:
        return []
    requested = {ctx.url, ctx.report.requested_url}
    hits = [r for r in render.refused if r.code == BLOCKED_TARGET_CODE
            and not _PORT_REFUSAL.search(r.reason) and r.url not in requested]
    if not hits:
        return []
    more = f" (+{len(hits) - 1} more)" if len(hits) > 1 else ""
    return [_signal("refused_subrequest",
                    f"refused {_short(hits[0].url)}: {_short(hits[0].reason, 100)}{more}")]


def _words(text: str | None) -> set[str]:
    return {w.lower() for w in _WORDS.findall(text or "")}


def _overlap(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, min(len(a), len(b)))


@rule("render_cloaking", 25, "Render scans: the page a browser sees is another page than the "
      "static HTML of the same URL: the static HTML has real content "
      f"(≥ {CLOAKING_MIN_STATIC_TEXT} characters of text) and the rendered page shares neither "
      f"its title nor more than {int(CLOAKING_MAX_OVERLAP * 100)} % of its words.")
def render_cloaking(ctx: Context) -> list[Signal]:
    """Cloakers serve a harmless page to anything that does not run script and the lure to
    browsers. An app's static shell ("enable JavaScript") has too little text to count."""
    static = ctx.static
    if ctx.report.render is None or static is None or not _same_page(ctx):
        return []
    if len(static.features.text) < CLOAKING_MIN_STATIC_TEXT:
        return []
    titles = _words(static.title), _words(ctx.report.title)
    if titles[0] and titles[1] and titles[0] & titles[1]:
        return []
    text = _words(static.features.text), _words(ctx.report.features.text)
    if not text[1] or _overlap(*text) > CLOAKING_MAX_OVERLAP:
        return []
    return [_signal("render_cloaking",
                    f"static title {_short(static.title or '', 60)!r}, rendered "
                    f"{_short(ctx.report.title or '', 60)!r}; "
                    f"{_overlap(*text):.0%} of the words in common")]
