"""The brand catalogue: which brands a page presents itself as, and whether a host is theirs.

The catalogue is data (`data/brands.json`, extendable with the operator's own file,
`BRANDS_PATH`), validated with pydantic on load: a bad file is a start-up error, never a silent
empty catalogue. Everything else here is a pure function of a report or a URL.

Presence is weighed by *where* a name appears: how a page names itself (og:site_name, its
title read as "<brand> <account words>", its canonical URL, its icon, its form text) counts;
a brand named once in an article body does not. See docs/analysis.md.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import idna
from confusable_homoglyphs import confusables
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)
from rapidfuzz.distance import DamerauLevenshtein

from .config import ConfigError
from .models import Features, Report
from .urls import host_of, is_registry_suffix, registrable_domain

SHIPPED = "brands.json"

# --- the file format ------------------------------------------------------------------------

BrandId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
Name = Annotated[str, StringConstraints(min_length=2, max_length=64)]
Token = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]{2,40}$")]
Category = Literal["payment", "bank", "webmail", "cloud", "social", "gaming", "streaming",
                   "retail", "travel", "shipping", "crypto", "telecom", "government",
                   "security", "other"]


def _site(domain: str) -> str:
    """A domain as written in the file -> its registrable domain; ValueError if no host."""
    host = host_of(f"http://{domain.strip()}/")
    if host is None or "." not in host:
        raise ValueError(f"not a domain name: {domain!r}")
    return registrable_domain(host)


def _sites(values: list[str]) -> list[str]:
    return list(dict.fromkeys(_site(v) for v in values))


class Brand(BaseModel):
    """One brand. `domains`: registrable domains it owns (a host is reduced to its registrable
    domain on load); `assets`: extra domains its pages load logos, styles and scripts from;
    `tokens`: the words look-alike domains use (default: the first label of its first domain);
    `ambiguous`: its names are also common words (Apple, Target), so they match only as
    written (capitalised) and never inside a longer word of a domain;
    `owner`: the organisation behind it - brands with one owner (AOL and Yahoo, Instagram and
    Facebook) are one organisation, so one's page may use the other's name and assets;
    `software`: a product installed on other people's domains (Roundcube, cPanel), so its name
    on a foreign domain is normal - only look-alike hosts of its own domains count;
    `user_content`: host names under its domains where anyone publishes (sharepoint.com,
    sites.google.com): a page there is its author's, not the brand's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: BrandId
    category: Category = "other"
    names: Annotated[list[Name], Field(min_length=1, max_length=20)]
    domains: Annotated[list[str], Field(min_length=1, max_length=64)]
    assets: Annotated[list[str], Field(max_length=64)] = []
    tokens: Annotated[list[Token], Field(max_length=20)] = []
    ambiguous: bool = False
    owner: BrandId | None = None
    software: bool = False
    user_content: Annotated[list[Annotated[str, StringConstraints(
        pattern=r"^[a-z0-9-]+(\.[a-z0-9-]+)+$")]], Field(max_length=64)] = []

    @field_validator("domains", "assets")
    @classmethod
    def _registrable(cls, values: list[str]) -> list[str]:
        return _sites(values)

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def organisation(self) -> str:
        return self.owner or self.id

    def lookalike_tokens(self) -> list[str]:
        if self.tokens:
            return list(self.tokens)
        first = self.domains[0].split(".", 1)[0]
        return [first] if len(first) >= 3 else []


class CatalogueFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1]
    # Identity services a login form may post to on behalf of any organisation (Okta, Auth0):
    # a password sent there is not sent to an attacker.
    identity_providers: Annotated[list[str], Field(max_length=500)] = []
    brands: Annotated[list[Brand], Field(max_length=5000)]

    @field_validator("identity_providers")
    @classmethod
    def _registrable(cls, values: list[str]) -> list[str]:
        return _sites(values)


class CatalogueError(ConfigError):
    """The catalogue file is missing, not JSON, or not in the format (start-up error)."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"invalid configuration: BRANDS_PATH: {problem}")


def _parse(text: str, where: str) -> CatalogueFile:
    try:
        return CatalogueFile.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise CatalogueError(f"{where} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                    for e in exc.errors()[:3]]
        more = f" (and {exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        raise CatalogueError(f"{where}: {'; '.join(problems)}{more}") from None


def _merge(base: CatalogueFile, extra: CatalogueFile) -> CatalogueFile:
    """The operator's brands replace shipped ones with the same id and add the rest."""
    brands = {b.id: b for b in base.brands}
    brands.update({b.id: b for b in extra.brands})
    idps = list(dict.fromkeys([*base.identity_providers, *extra.identity_providers]))
    return CatalogueFile(version=1, identity_providers=idps, brands=list(brands.values()))


def load_catalogue(extra_path: str | Path | None = None) -> Catalogue:
    """The shipped catalogue, extended by `extra_path` when given. CatalogueError when the
    operator's file cannot be read or is not in the format."""
    shipped = resources.files("safeurl_worker").joinpath("data", SHIPPED).read_text("utf-8")
    data = _parse(shipped, SHIPPED)
    if extra_path:
        try:
            text = Path(extra_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CatalogueError(f"cannot read {extra_path}: {exc}") from None
        data = _merge(data, _parse(text, str(extra_path)))
    return Catalogue(data)


@cache
def shipped_catalogue() -> Catalogue:
    """The catalogue shipped with the package, loaded once (it never changes at run time)."""
    return load_catalogue()


# --- reading names in page text -------------------------------------------------------------

# Names that are also ordinary words or short acronyms match only as written (or in capitals).
_COMMON_WORDS = frozenset({"outlook", "teams", "office", "azure", "prime", "max", "meta",
                           "hermes", "free", "spectrum", "citizens", "discover", "line", "box",
                           "square", "target", "steam", "orange", "rogers", "zoom", "slack"})


def _case_sensitive(brand: Brand, name: str) -> bool:
    return (brand.ambiguous or len(name) <= 4 or name.lower() in _COMMON_WORDS
            or name.isupper())


def _alternation(names: Iterable[str]) -> str:
    ordered = sorted(set(names), key=len, reverse=True)  # longest first: "Apple ID" > "Apple"
    return "|".join(re.escape(n) for n in ordered)


# "Sign in with Google" is how a site offers someone else's login, not how it impersonates.
_SSO = re.compile(r"\b(?:sign|log)\s*(?:in|on|up)\s+(?:with|via|using|through)\s+\S+(?:\s\S+)?"
                  r"|\b(?:continue|connect|login|register|pay|checkout|share)\s+(?:with|via|on)"
                  r"\s+\S+(?:\s\S+)?", re.IGNORECASE)

# Words a site's own sign-in page puts next to its name ("PayPal: Log in to your account").
_ACCOUNT_WORDS = frozenset({
    "log", "login", "logon", "in", "on", "sign", "signin", "signon", "to", "your", "my", "the",
    "a", "of", "and", "for", "with", "account", "accounts", "id", "online", "banking", "bank",
    "secure", "security", "verify", "verification", "verified", "confirm", "confirmation",
    "update", "unlock", "locked", "suspended", "limited", "access", "portal", "web", "mail",
    "email", "webmail", "inbox", "wallet", "billing", "payment", "payments", "pay", "home",
    "page", "welcome", "official", "site", "service", "services", "customer", "support", "help",
    "center", "centre", "store", "app", "apps", "cloud", "drive", "storage", "business",
    "personal", "member", "members", "password", "recovery", "reset", "authentication",
    "authenticate", "session", "required", "notice", "alert", "here", "now", "please", "continue",
    "mobile", "wireless", "tracking", "track", "delivery", "package", "parcel", "shipment",
    "refund", "tax", "return",
    # What lures say about the account ("Your PayPal account is on hold").
    "is", "has", "been", "was", "hold", "disabled",
    "restricted", "important", "about", "action", "expired",
    # The same words in the languages most phishing besides English is written in.
    "anmelden", "anmeldung", "einloggen", "konto", "konten", "kundenkonto", "sicherheit",
    "connexion", "connecter", "compte", "identifiant", "espace", "client", "mon", "votre",
    "iniciar", "sesion", "sesión", "cuenta", "acceso", "entrar", "conta", "acessar", "minha",
    "accedi", "accesso", "conto", "inloggen", "rekening", "mijn", "zaloguj",
})

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# Title separators: " - ", " | ", ": ", en/em dashes, middle dots, guillemets.
_DASHES = "\u2013\u2014\u00b7\u2022\u00bb"
_SEGMENTS = re.compile(rf"\s+[|\-{_DASHES}]\s+|\s*[|:{_DASHES}]\s*")


@dataclass(frozen=True)
class Evidence:
    where: str  # "title", "og:site_name", "icon", ...
    text: str  # what was seen there (short)
    points: float
    identity: bool  # how the page names itself, not merely what it mentions


@dataclass
class Claim:
    """A brand the page presents itself as, with the evidence."""

    brand: Brand
    evidence: list[Evidence] = field(default_factory=list)

    @property
    def points(self) -> float:
        return sum(e.points for e in self.evidence)

    @property
    def identity(self) -> bool:
        return any(e.identity for e in self.evidence)

    def summary(self, limit: int = 4) -> str:
        best = sorted(self.evidence, key=lambda e: -e.points)[:limit]
        return "; ".join(f"{e.where} {e.text!r}" for e in best)


# A claim needs this many points and at least one identity evidence; a page that names
# itself as another site (og:site_name) needs more.
PRESENCE_POINTS = 4.0
PRESENCE_POINTS_OTHER_SITE_NAME = 8.0


@dataclass(frozen=True)
class Lookalike:
    brand: Brand
    kind: Literal["brand_domain_in_host", "brand_in_domain", "brand_in_subdomain",
                  "typosquat", "homoglyph", "brand_domain_in_path"]
    detail: str


class Catalogue:
    """The loaded catalogue with its indexes."""

    def __init__(self, data: CatalogueFile) -> None:
        self.brands: tuple[Brand, ...] = tuple(data.brands)
        self.identity_providers = frozenset(data.identity_providers)
        owners: dict[str, list[Brand]] = {}
        for b in self.brands:
            for site in (*b.domains, *b.assets):
                owners.setdefault(site, []).append(b)
        self._owners: Mapping[str, list[Brand]] = owners
        sites: dict[str, set[str]] = {}  # organisation -> every domain and asset domain
        zones: dict[str, set[str]] = {}  # organisation -> registry suffixes it owns (gov.uk)
        for b in self.brands:
            sites.setdefault(b.organisation, set()).update(b.domains, b.assets)
            zones.setdefault(b.organisation, set()).update(
                d for d in b.domains if is_registry_suffix(d))
        self._org_sites: Mapping[str, frozenset[str]] = {
            org: frozenset(s) for org, s in sites.items()}
        self._org_zones: Mapping[str, frozenset[str]] = {
            org: frozenset(z) for org, z in zones.items()}
        self._user_content = tuple(sorted({h for b in self.brands for h in b.user_content}))
        self._by_name: dict[str, list[Brand]] = {}
        # Every word of every brand name: a word of page text whose Latin look-alike is one of
        # these is read as that word (PayPal with a Cyrillic P); other words are left alone.
        self._name_words = frozenset(w.lower() for b in self.brands for n in b.names
                                     for w in _WORD.findall(n))
        loose: list[str] = []
        exact: list[str] = []
        for b in self.brands:
            for n in b.names:
                if _case_sensitive(b, n):
                    exact += [n, n.upper()]
                    self._by_name.setdefault(n, []).append(b)
                    self._by_name.setdefault(n.upper(), []).append(b)
                else:
                    loose.append(n)
                    self._by_name.setdefault(n.lower(), []).append(b)
        edge_l, edge_r = r"(?<![\w&.+-])", r"(?![\w&+]|-\w|\.\w)"
        self._loose = re.compile(f"{edge_l}(?:{_alternation(loose)}){edge_r}", re.IGNORECASE)
        self._exact = re.compile(f"{edge_l}(?:{_alternation(exact)}){edge_r}")
        tokens: dict[str, list[Brand]] = {}
        for b in self.brands:
            for t in b.lookalike_tokens():
                tokens.setdefault(t, []).append(b)
        # Longest first, so "paypal" in a host is reported before "pay..." anything shorter.
        self._tokens = dict(sorted(tokens.items(), key=lambda kv: -len(kv[0])))
        # The same, by length (each list in that order): a misspelling is within two letters
        # of its token's length, so `_similar` looks at five lengths, not every token.
        self._tokens_by_len: dict[int, list[tuple[str, list[Brand]]]] = {}
        for t, bs in self._tokens.items():
            self._tokens_by_len.setdefault(len(t), []).append((t, bs))
        # Short brand domains (t.co, x.com) are substrings of too many honest names.
        self._brand_domains = [(d, b) for b in self.brands for d in b.domains
                               if len(d.split(".", 1)[0]) >= 3]

    def __len__(self) -> int:
        return len(self.brands)

    # --- ownership --------------------------------------------------------------------------

    def owners(self, host: str) -> list[Brand]:
        """Brands whose domains or asset domains the host's site is (not a government zone:
        a state's site under gov.br is not the federal tax office's asset)."""
        return [] if self.user_content(host) else self._owners.get(registrable_domain(host), [])

    def user_content(self, host: str) -> bool:
        """The host is where a brand lets anyone publish (a SharePoint tenant, a Google Site)."""
        return any(_under(host, h) for h in self._user_content)

    def _zoned(self, host: str) -> bool:
        """The host is under a government's suffix of the catalogue (gov.uk)."""
        return any(_under(host, z) for zs in self._org_zones.values() for z in zs)

    def owns(self, brand: Brand, host: str) -> bool:
        """The host is the brand's, or another brand's of the same organisation. A government's
        suffix (gov.uk) owns every name under it: only the government registers there. A
        platform's suffix (github.io, myshopify.com) owns nothing: anyone may get a name there."""
        org = brand.organisation
        if self.user_content(host):
            return False
        if registrable_domain(host) in self._org_sites.get(org, frozenset()):
            return True
        return any(_under(host, zone) for zone in self._org_zones.get(org, frozenset()))

    def same_organisation(self, host_a: str, host_b: str) -> bool:
        """One site, one brand of the catalogue, or b an identity provider (Okta, Auth0)."""
        site_a, site_b = registrable_domain(host_a), registrable_domain(host_b)
        if site_a == site_b or site_b in self.identity_providers:
            return True
        orgs_a = {b.organisation for b in self._owners.get(site_a, [])}
        return any(b.organisation in orgs_a for b in self._owners.get(site_b, []))

    # --- names ------------------------------------------------------------------------------

    def plain(self, text: str) -> str:
        """Text as a reader sees it: without invisible format characters (zero-width spaces
        and joiners, soft hyphens, bidi controls), and with a word that imitates a brand-name
        word in look-alike letters (Cyrillic, Greek, fullwidth) written in Latin letters."""
        if text.isascii():
            return text
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
        return _WORD.sub(lambda m: self._unconfused(m.group(0)), text)

    def _unconfused(self, word: str) -> str:
        if word.isascii():
            return word
        latin = "".join(_latin_lookalike(ch).upper() if ch.isupper() else _latin_lookalike(ch)
                        for ch in word)
        return latin if latin.isascii() and latin.lower() in self._name_words else word

    def named(self, text: str | None) -> list[tuple[Brand, str]]:
        """(brand, name as found) for each brand named in text on word boundaries."""
        if not text:
            return []
        text = self.plain(text)
        found: dict[str, tuple[Brand, str]] = {}
        for m in [*self._loose.finditer(text), *self._exact.finditer(text)]:
            key = m.group(0)
            for b in self._by_name.get(key, []) or self._by_name.get(key.lower(), []):
                found.setdefault(b.id, (b, key))
        return list(found.values())

    def _identity_named(self, text: str | None, bare: bool = True
                        ) -> list[tuple[Brand, str]]:
        """Brands a title or heading names *itself* as: a segment ("Sign in - Google Accounts")
        that holds the brand name and otherwise only account words. A segment that is the bare
        name counts only when the rest of the title is account words too ("PayPal: Log in"),
        not when it names a site ("PayPal - Wikipedia", "Netflix | The Verge"), and never in
        a heading (`bare=False`: an article's <h1> is often just the name of its subject)."""
        if not text:
            return []
        segments = [s for s in _SEGMENTS.split(self.plain(text)) if _WORD.search(s)]
        out: dict[str, tuple[Brand, str]] = {}
        for i, segment in enumerate(segments):
            for brand, name in self.named(segment):
                words = _words(segment.replace(name, " "))
                if len(words) > 8 or not words <= _ACCOUNT_WORDS:
                    continue
                others = [_words(s) for j, s in enumerate(segments) if j != i]
                if words or (bare and all(o <= _ACCOUNT_WORDS for o in others)):
                    out.setdefault(brand.id, (brand, name))
        return list(out.values())

    # --- presence ---------------------------------------------------------------------------

    def presented(self, report: Report, *, ad_hosts: frozenset[str] = frozenset()
                  ) -> list[Claim]:
        """Brands the page presents itself as (enough evidence, some of it identity)."""
        claims: dict[str, Claim] = {}
        for brand, ev in self._evidence(report, ad_hosts):
            claims.setdefault(brand.id, Claim(brand)).evidence.append(ev)
        own_name = self._own_site_name(report.features)
        result = []
        for claim in claims.values():
            need = PRESENCE_POINTS
            # A publisher's own site name raises the bar for pages that merely mention a
            # brand; it does not for a title or credential form that names itself as the
            # brand (the tag is the page author's to write, so a kit can set a decoy).
            strong = any(e.identity and e.where in ("title", "form") for e in claim.evidence)
            if own_name and not strong and not any(
                    e.where in ("og:site_name", "application-name") for e in claim.evidence):
                need = PRESENCE_POINTS_OTHER_SITE_NAME
            if claim.identity and claim.points >= need:
                result.append(claim)
        return sorted(result, key=lambda c: -c.points)

    def _own_site_name(self, f: Features) -> bool:
        """The page declares a site name that names no catalogue brand (a publisher)."""
        names = [n for n in (f.meta.og_site_name, f.meta.application_name) if n]
        return bool(names) and not any(self.named(n) for n in names)

    def _evidence(self, report: Report, ad_hosts: frozenset[str]
                  ) -> Iterator[tuple[Brand, Evidence]]:
        f = report.features
        yield from self._text_evidence(report.title, f)
        yield from self._url_evidence(f, ad_hosts)

    def _text_evidence(self, title: str | None, f: Features
                       ) -> Iterator[tuple[Brand, Evidence]]:
        for where, value in (("og:site_name", f.meta.og_site_name),
                             ("application-name", f.meta.application_name)):
            for b, n in self.named(value):
                yield b, Evidence(where, n, 4, True)
        yield from self._titled("title", title, 4, 1)
        yield from self._titled("og:title", f.meta.og_title, 2, 0.5)
        for i, heading in enumerate(f.headings[:3]):
            yield from self._titled("heading", heading, 2 if i == 0 else 1, 0.5)
        for form in f.forms:
            if form.has_password or form.has_email or form.has_card or form.has_otp:
                for b, n in self.named(_SSO.sub(" ", form.text)):
                    yield b, Evidence("form", n, 3, True)
        for button in f.buttons[:10]:
            for b, n in self.named(_SSO.sub(" ", button)):
                yield b, Evidence("button", n, 1, False)
        for img in f.images[:30]:
            yield from self._logo(img.alt, img.src)
        for match in _COPYRIGHT.finditer(f.text):
            for b, n in self.named(match.group(0)):
                yield b, Evidence("copyright", n, 3, True)
        yield from self._counted(f.text)

    def _counted(self, text: str) -> Iterator[tuple[Brand, Evidence]]:
        """Body text is weak: one point at most, for a brand named three times or more."""
        counts: dict[str, int] = {}
        brands: dict[str, Brand] = {}
        for pattern in (self._loose, self._exact):
            for m in pattern.finditer(text):
                key = m.group(0)
                for b in self._by_name.get(key, []) or self._by_name.get(key.lower(), []):
                    counts[b.id] = counts.get(b.id, 0) + 1
                    brands[b.id] = b
        for bid, count in counts.items():
            yield brands[bid], Evidence("text", f"{count} mention(s)",
                                        1.0 if count >= 3 else 0.5, False)

    def _titled(self, where: str, text: str | None, identity_points: float,
                mention_points: float) -> Iterator[tuple[Brand, Evidence]]:
        identity = {b.id for b, _ in self._identity_named(text, bare=where == "title")}
        for b, n in self.named(text):
            if b.id in identity:
                yield b, Evidence(where, _clip(text or ""), identity_points, True)
            else:
                yield b, Evidence(where + " mentions", n, mention_points, False)

    def _logo(self, alt: str, src: str) -> Iterator[tuple[Brand, Evidence]]:
        """<img alt="PayPal"> or <img src=".../paypal-logo.svg">: the brand's logo."""
        words = _WORD.findall(alt)
        for b, _name in self.named(alt):
            if len(words) <= 3 or "logo" in alt.lower():
                yield b, Evidence("logo", _clip(alt), 2, False)
        path = src.rsplit("/", 1)[-1].lower()
        if "logo" in path:
            for b in self._tokens_in(path):
                yield b, Evidence("logo", _clip(path), 2, False)

    def _tokens_in(self, text: str) -> list[Brand]:
        """Brand tokens in a file name, as whole words ("paypal-logo.svg")."""
        parts = set(re.split(r"[^a-z0-9]+", _ICON_NAMES.sub("-", text)))
        return [b for t, bs in self._tokens.items() if t in parts for b in bs]

    def _url_evidence(self, f: Features, ad_hosts: frozenset[str]
                      ) -> Iterator[tuple[Brand, Evidence]]:
        for where, url in (("canonical", f.meta.canonical), ("og:url", f.meta.og_url)):
            for b in self._owned_by(url):
                yield b, Evidence(where, _clip(url or ""), 4, True)
        for b in self._owned_by(f.meta.og_image):
            yield b, Evidence("og:image", _clip(f.meta.og_image or ""), 2, False)
        for icon in f.icons[:5]:  # hot-linked from the brand (a copied file proves nothing)
            for b in self._owned_by(icon):
                yield b, Evidence("icon", _clip(icon), 3, True)
        yield from self._hosted("stylesheet", f.stylesheets, 2, ad_hosts)
        yield from self._hosted("image", [i.src for i in f.images], 1, ad_hosts)
        yield from self._hosted("script", f.external_scripts, 1, ad_hosts)

    def _hosted(self, where: str, urls: Sequence[str], points: float,
                ad_hosts: frozenset[str]) -> Iterator[tuple[Brand, Evidence]]:
        """Assets loaded from a brand's own hosts (a clone hotlinking the original), once per
        brand and kind; ad, analytics and widget hosts do not count."""
        seen: set[str] = set()
        for url in urls[:50]:
            host = host_of(url)
            if not host or registrable_domain(host) in ad_hosts or host in ad_hosts:
                continue
            for b in self.owners(host):
                if b.id not in seen:
                    seen.add(b.id)
                    yield b, Evidence(where, host, points, False)

    def _owned_by(self, url: str | None) -> list[Brand]:
        host = host_of(url)
        return self.owners(host) if host else []

    # --- look-alike domains -----------------------------------------------------------------

    def lookalike(self, url: str) -> Lookalike | None:
        """The strongest way this URL's host (or path) imitates a brand it does not belong to."""
        host = host_of(url)
        if not host or ":" in host or not any(c.isalpha() for c in host):
            return None
        if self.owners(host) or self._zoned(host) or self.user_content(host):
            return None  # the brand's (or a government's) name, or its users' space: not a copy
        site = registrable_domain(host)
        checks = (self._domain_in_host(host, site), self._token_in_domain(host, site),
                  self._similar(site), self._domain_in_path(url))
        return next((c for c in checks if c is not None), None)

    def _domain_in_host(self, host: str, site: str) -> Lookalike | None:
        """paypal.com-resolution-center.info, accounts.google.com.signin-verify.net"""
        for domain, b in self._brand_domains:
            # `domain in host` first: the one test that rules out nearly every brand, cheaply.
            if domain in host and domain != site and not _under(host, domain) and \
                    _embedded(domain, host):
                return Lookalike(b, "brand_domain_in_host", f"{domain} inside {host}")
        return None

    def _token_in_domain(self, host: str, site: str) -> Lookalike | None:
        """amazon-order-verify.com (registrable domain), paypal.login.example.net (subdomain)"""
        label = site.split(".", 1)[0]
        sub = host[: -len(site)].rstrip(".")
        for part, kind in ((label, "brand_in_domain"), (sub, "brand_in_subdomain")):
            words = [w for w in re.split(r"[.-]", part) if w]
            for t, bs in self._tokens.items():
                if t not in part:  # both tests below need the token inside one of the words
                    continue
                for b in bs:
                    if t in words or (len(t) >= 5 and not b.ambiguous
                                      and any(_glued(t, w) for w in words)):
                        return Lookalike(b, kind, f"{t!r} in {host}")  # type: ignore[arg-type]
        return None

    def _similar(self, site: str) -> Lookalike | None:
        """Homoglyphs (paypal with a Cyrillic a, shown from its xn-- form per UTS #46) and
        typosquats (paypa1, gooogle: one edit, two for long names) of a brand's token."""
        label = site.split(".", 1)[0]
        shown = _unicode_label(label)
        skeleton = _skeleton(shown)
        if label in self._tokens:
            return None
        n = len(skeleton)
        near = [tb for size in range(n + 2, n - 3, -1) for tb in self._tokens_by_len.get(size, ())]
        for t, bs in near:  # longest first, as in `_tokens`
            if len(t) < 5:
                continue
            if skeleton == t:
                kind = "typosquat" if shown.isascii() else "homoglyph"
                return Lookalike(bs[0], kind, f"{shown} looks like {t}")  # type: ignore[arg-type]
            if bs[0].ambiguous or skeleton in self._tokens or skeleton == t + "s":
                continue  # common words sit one edit away from other common words
            limit = 1 if len(t) < 9 else 2
            if abs(len(skeleton) - len(t)) > limit:
                continue  # the distance is at least the difference in length
            if DamerauLevenshtein.distance(skeleton, t, score_cutoff=limit) <= limit:
                return Lookalike(bs[0], "typosquat", f"{shown} is {t} misspelled")
        return None

    def _domain_in_path(self, url: str) -> Lookalike | None:
        """https://host.example/www.paypal.com/signin: the brand's domain shown in the path."""
        path = url.split("://", 1)[-1].partition("/")[2].lower()[:500]
        if not path:
            return None
        for domain, b in self._brand_domains:
            if _embedded(domain, path):
                return Lookalike(b, "brand_domain_in_path", f"{domain} in the path")
        return None


# "© 2024 PayPal, Inc." / "Copyright 2024 Apple Inc.": who the page says it belongs to.
_COPYRIGHT = re.compile(r"(?:©|\(c\)|copyright)\s*(?:\d{4}(?:\s*[-\u2013]\s*\d{4})?)?[\s,]*"
                        r"[^\W\d][^\n.|]{0,40}", re.IGNORECASE)

# Standard icon file names that hold a brand's name without being its logo.
_ICON_NAMES = re.compile(r"apple-?touch-?icons?(?:-precomposed)?|apple-?icons?|android-?chrome"
                         r"|mstile|safari-pinned-tab|windows-?tile|favicons?")


def _glued(token: str, word: str) -> bool:
    """paypalsecure, verifyapple: the token glued to another word of 3+ letters (not a plural
    or a longer ordinary word such as stripes or amazonas)."""
    return token in word and len(word) - len(token) >= 3


def _words(text: str) -> frozenset[str]:
    return frozenset(w.lower() for w in _WORD.findall(text))


def _under(host: str, domain: str) -> bool:
    """The host is the domain or a name under it (a subdomain is not a look-alike)."""
    return host == domain or host.endswith("." + domain)


def _embedded(domain: str, text: str) -> bool:
    # The substring test first: it is what rules out nearly every brand domain, and it costs a
    # C search instead of a regex per domain per scan (this ran in every scan's hot path).
    return domain in text and re.search(rf"(?:^|[./=-]){re.escape(domain)}(?:[./?-]|$)",
                                        text) is not None


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _unicode_label(label: str) -> str:
    """What a browser shows for an xn-- label (UTS #46)."""
    if not label.startswith("xn--"):
        return label
    try:
        return str(idna.decode(label, uts46=True))
    except idna.IDNAError:
        return label


# ASCII look-alikes the Unicode confusables table leaves out of a host name.
_ASCII_TRICKS = (("rn", "m"), ("vv", "w"), ("cl", "d"))


@lru_cache(maxsize=4096)
def _skeleton(label: str) -> str:
    """The label with every character replaced by the Latin letter it can be confused with
    (Unicode confusables, via confusable_homoglyphs), digits read as letters (0 -> o, 1 -> l)."""
    out = []
    for ch in label.lower():
        out.append(_latin_lookalike(ch))
    text = "".join(out)
    for a, b in _ASCII_TRICKS:
        text = text.replace(a, b)
    return text


@lru_cache(maxsize=4096)
def _latin_lookalike(ch: str) -> str:
    if ch.isascii() and not ch.isdigit():
        return ch
    found = confusables.is_confusable(ch, greedy=True, preferred_aliases=["latin"])
    if not found:
        return ch
    for glyph in found[0]["homoglyphs"]:
        c = str(glyph["c"]).lower()
        if c.isascii() and c.isalpha() and len(c) == 1:
            return c
    return ch


__all__ = ["Brand", "Catalogue", "CatalogueError", "CatalogueFile", "Claim", "Evidence",
           "Lookalike", "load_catalogue", "shipped_catalogue"]
