"""The labelled pages `python -m bench.verdicts` scores.

Two sources:

* `shared`: the third-party corpus in `../shared/corpus` (real news pages at their own URLs, and
  phishing-kit pages with a look-alike host each). It is read where it lies, never copied into
  the repository (see its README for the licences).
* `synthetic`: pages generated here from templates, always available. Phishing pages of the most
  impersonated brands at look-alike hosts, in the styles kits use (static clones with a password
  form, e-mail then password, card forms, one-time-code forms, forms written by obfuscated
  script, lures that only link to a kit); and benign pages: the brands' own sign-in pages at
  their own domains, ordinary sites with a login form to themselves, and pages that mention,
  pay with or sign in with a brand without pretending to be it.

Everything is deterministic (the random choices are seeded by the page id), so the same code
gives the same pages, labels and split on every machine.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import html
import json
import random
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

Label = Literal["phish", "benign"]
Source = Literal["shared", "synthetic"]
Split = Literal["tune", "report"]


@dataclasses.dataclass(frozen=True)
class Page:
    id: str  # stable, unique: the split is derived from `group`, which defaults to it
    label: Label
    source: Source
    url: str  # what is scanned, as a user would submit it (IDN hosts in Unicode)
    body: bytes
    brand: str | None = None  # the brand impersonated (phish) or shown (benign), if any
    style: str = ""
    group: str = ""  # pages of one group land in the same split half
    content_type: str = "text/html; charset=utf-8"

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or ""

    @property
    def split(self) -> Split:
        return split_of(self.group or self.id)


def split_of(key: str) -> Split:
    """The half a page belongs to: a hash of its group key, so it never changes with the set."""
    return "tune" if hashlib.sha256(key.encode()).digest()[0] % 2 == 0 else "report"


def ascii_host(host: str) -> str:
    """The DNS form of a host name. The homoglyphs used here (Cyrillic letters) encode the same
    under IDNA 2003 and UTS #46, so the standard library's codec is enough."""
    return host.encode("idna").decode("ascii") if not host.isascii() else host


# --- the shared corpus --------------------------------------------------------------------------


class _KitEntry(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    brand: str
    host: str


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    benign: dict[str, str] = {}
    phish: dict[str, _KitEntry] = {}


def _utf8_type(body: bytes) -> str:
    """Real servers mostly declare UTF-8; a page that is not UTF-8 gets no charset, as from a
    server that leaves it to the page's own <meta charset>."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return "text/html"
    return "text/html; charset=utf-8"


def shared_pages(corpus: Path) -> list[Page]:
    """The pages of `corpus` (the ../shared/corpus layout); empty when it is absent."""
    manifest_path = corpus / "manifest.json"
    if not manifest_path.is_file():
        return []
    manifest = _Manifest.model_validate_json(manifest_path.read_bytes())
    pages = []
    for name, url in sorted(manifest.benign.items()):
        raw = (corpus / "benign" / name).read_bytes()
        body = gzip.decompress(raw) if name.endswith(".gz") else raw
        pages.append(Page(f"shared/benign/{name}", "benign", "shared", url, body,
                          style="news", content_type=_utf8_type(body)))
    for name, kit in sorted(manifest.phish.items()):
        body = (corpus / "phish" / name).read_bytes()
        # Each kit at http and, as most phishing is now, at https with a valid certificate.
        for scheme in ("http", "https"):
            pages.append(Page(f"shared/phish/{name}/{scheme}", "phish", "shared",
                              f"{scheme}://{kit.host}/", body, brand=kit.brand, style="kit",
                              group=f"shared/phish/{name}", content_type=_utf8_type(body)))
    return pages


# --- brands -------------------------------------------------------------------------------------

Flow = Literal["password", "card", "otp"]


@dataclasses.dataclass(frozen=True)
class Brand:
    key: str
    name: str
    domains: tuple[str, ...]  # its registrable domains; the first is the main one
    login: str  # its own sign-in page, https://<login>
    assets: str  # the host its logos, icons and styles come from
    flow: Flow = "password"  # what its phishing pages most often ask for
    aliases: tuple[str, ...] = ()  # product names pages use instead of the brand's

    @property
    def login_host(self) -> str:
        return self.login.split("/", 1)[0]

    @property
    def label(self) -> str:
        """The word typosquats play on: the main domain's first label (unless it is too short
        to play on, as `x`)."""
        first = self.domains[0].split(".")[0]
        return first if len(first) > 2 else max((d.split(".")[0] for d in self.domains), key=len)


BRANDS: tuple[Brand, ...] = (
    Brand("paypal", "PayPal", ("paypal.com",), "www.paypal.com/signin", "www.paypalobjects.com"),
    Brand("microsoft", "Microsoft", ("microsoft.com", "microsoftonline.com", "live.com",
                                     "office.com"),
          "login.microsoftonline.com/common/oauth2/v2.0/authorize", "aadcdn.msauth.net",
          aliases=("Office 365", "Outlook", "OneDrive")),
    Brand("google", "Google", ("google.com", "gmail.com"),
          "accounts.google.com/v3/signin/identifier", "ssl.gstatic.com", aliases=("Gmail",)),
    Brand("apple", "Apple", ("apple.com", "icloud.com"), "appleid.apple.com/sign-in",
          "appleid.cdn-apple.com", aliases=("Apple ID", "iCloud")),
    Brand("amazon", "Amazon", ("amazon.com",), "www.amazon.com/ap/signin", "m.media-amazon.com",
          flow="card"),
    Brand("netflix", "Netflix", ("netflix.com",), "www.netflix.com/login", "assets.nflxext.com",
          flow="card"),
    Brand("facebook", "Facebook", ("facebook.com",), "www.facebook.com/login/",
          "static.xx.fbcdn.net"),
    Brand("instagram", "Instagram", ("instagram.com",), "www.instagram.com/accounts/login/",
          "static.cdninstagram.com"),
    Brand("whatsapp", "WhatsApp", ("whatsapp.com",), "web.whatsapp.com/", "static.whatsapp.net",
          flow="otp"),
    Brand("linkedin", "LinkedIn", ("linkedin.com",), "www.linkedin.com/login",
          "static.licdn.com"),
    Brand("twitter", "X", ("x.com", "twitter.com"), "x.com/i/flow/login", "abs.twimg.com",
          aliases=("Twitter",)),
    Brand("dhl", "DHL", ("dhl.com", "dhl.de"), "www.dhl.com/global-en/home/login.html",
          "www.dhl.com", flow="card", aliases=("DHL Express",)),
    Brand("usps", "USPS", ("usps.com",), "reg.usps.com/entreg/LoginAction_input",
          "www.usps.com", flow="card"),
    Brand("fedex", "FedEx", ("fedex.com",), "www.fedex.com/secure-login/", "www.fedex.com",
          flow="card"),
    Brand("ups", "UPS", ("ups.com",), "www.ups.com/lasso/login", "www.ups.com", flow="card"),
    Brand("chase", "Chase", ("chase.com",), "secure.chase.com/web/auth/dashboard",
          "static.chasecdn.com", flow="otp"),
    Brand("wellsfargo", "Wells Fargo", ("wellsfargo.com",),
          "connect.secure.wellsfargo.com/auth/login/present", "www17.wellsfargomedia.com",
          flow="otp"),
    Brand("bankofamerica", "Bank of America", ("bankofamerica.com",),
          "secure.bankofamerica.com/login/sign-in/signOnV2Screen.go", "www1.bac-assets.com"),
    Brand("citi", "Citi", ("citi.com", "citibank.com"), "online.citi.com/US/login.do",
          "online.citi.com", flow="card"),
    Brand("hsbc", "HSBC", ("hsbc.co.uk", "hsbc.com"), "www.hsbc.co.uk/security/",
          "www.hsbc.co.uk", flow="otp"),
    Brand("barclays", "Barclays", ("barclays.co.uk",), "bank.barclays.co.uk/olb/authlogin/",
          "bank.barclays.co.uk"),
    Brand("capitalone", "Capital One", ("capitalone.com",), "verified.capitalone.com/auth/signin",
          "ecm.capitalone.com", flow="card"),
    Brand("amex", "American Express", ("americanexpress.com",),
          "www.americanexpress.com/en-us/account/login", "www.aexp-static.com", flow="card",
          aliases=("Amex",)),
    Brand("santander", "Santander", ("santander.co.uk",),
          "retail.santander.co.uk/olb/app/logon/access", "www.santander.co.uk", flow="otp"),
    Brand("coinbase", "Coinbase", ("coinbase.com",), "login.coinbase.com/signin",
          "static-assets.coinbase.com", flow="otp"),
    Brand("binance", "Binance", ("binance.com",), "accounts.binance.com/en/login",
          "bin.bnbstatic.com", flow="otp"),
    Brand("kraken", "Kraken", ("kraken.com",), "www.kraken.com/sign-in", "assets.kraken.com"),
    Brand("yahoo", "Yahoo", ("yahoo.com",), "login.yahoo.com/", "s.yimg.com",
          aliases=("Yahoo Mail",)),
    Brand("aol", "AOL", ("aol.com",), "login.aol.com/", "s.yimg.com", aliases=("AOL Mail",)),
    Brand("dropbox", "Dropbox", ("dropbox.com",), "www.dropbox.com/login",
          "cfl.dropboxstatic.com"),
    Brand("docusign", "DocuSign", ("docusign.com", "docusign.net"),
          "account.docusign.com/oauth/auth", "docucdn-a.akamaihd.net"),
    Brand("adobe", "Adobe", ("adobe.com",), "auth.services.adobe.com/en_US/index.html",
          "www.adobe.com", aliases=("Adobe Document Cloud",)),
    Brand("ebay", "eBay", ("ebay.com",), "signin.ebay.com/signin/", "ir.ebaystatic.com"),
    Brand("steam", "Steam", ("steampowered.com", "steamcommunity.com"),
          "store.steampowered.com/login/", "community.akamai.steamstatic.com"),
    Brand("spotify", "Spotify", ("spotify.com",), "accounts.spotify.com/en/login",
          "accounts.scdn.co", flow="card"),
    Brand("att", "AT&T", ("att.com",), "signin.att.com/dynamic/iamLRR/LrrController",
          "www.att.com", aliases=("AT&T Mail",)),
    Brand("verizon", "Verizon", ("verizon.com",), "secure.verizon.com/signin",
          "ss7.vzw.com"),
    Brand("irs", "IRS", ("irs.gov",), "sa.www4.irs.gov/ola/", "www.irs.gov", flow="card",
          aliases=("Internal Revenue Service",)),
    Brand("wetransfer", "WeTransfer", ("wetransfer.com",), "wetransfer.com/account/signin",
          "prod-cdn.wetransfer.net"),
    Brand("github", "GitHub", ("github.com",), "github.com/login", "github.githubassets.com"),
)

# --- look-alike hosts ---------------------------------------------------------------------------

_WORDS = ("verify", "secure", "account", "login", "signin", "update", "support", "billing",
          "resolution-center", "confirm", "service", "auth", "recovery", "unlock", "security",
          "alert", "help", "online", "wallet", "customer", "access", "webapps", "session")
_TLDS = ("info", "net", "com", "online", "xyz", "top", "site", "live", "app", "support", "co",
         "io", "me", "click", "cc", "org", "pro")
# Hosts of ordinary small sites, used as the compromised sites that carry a kit in a path.
_COMPROMISED = ("greenvalley-dental.com", "st-marys-parish.org", "bluewaveplumbing.net",
                "oakridge-realty.com", "lakeside-bakery.co.uk", "hillcrest-vets.com",
                "northfield-tennis.org", "sunrise-yoga-studio.com", "maplewood-motors.net",
                "brightpath-tutoring.com")
# Latin letters and the Cyrillic letters that look the same.
_HOMOGLYPHS = {"a": "\u0430", "e": "\u0435", "o": "\u043e", "p": "\u0440", "c": "\u0441",
               "x": "\u0445", "y": "\u0443", "i": "\u0456", "s": "\u0455"}
_DIGIT_GLYPHS = {"o": "0", "l": "1", "i": "1", "e": "3", "a": "4", "s": "5"}


def _typo(label: str, rng: random.Random) -> str:
    """A typosquat of `label`: a letter left out, doubled, swapped, or a digit for a letter."""
    for _ in range(20):
        i = rng.randrange(len(label))
        op = rng.choice(("omit", "double", "swap", "digit"))
        if op == "omit" and len(label) > 4:
            out = label[:i] + label[i + 1:]
        elif op == "double":
            out = label[:i] + label[i] + label[i:]
        elif op == "swap" and i + 1 < len(label) and label[i] != label[i + 1]:
            out = label[:i] + label[i + 1] + label[i] + label[i + 2:]
        elif op == "digit" and label[i] in _DIGIT_GLYPHS:
            out = label[:i] + _DIGIT_GLYPHS[label[i]] + label[i + 1:]
        else:
            continue
        return out
    return label + label[-1]


def _homoglyph(label: str, rng: random.Random) -> str:
    spots = [i for i, ch in enumerate(label) if ch in _HOMOGLYPHS]
    if not spots:
        return label + "-" + rng.choice(_WORDS)
    i = rng.choice(spots)
    return label[:i] + _HOMOGLYPHS[label[i]] + label[i + 1:]


def _words(rng: random.Random, n: int) -> str:
    return "-".join(rng.sample(_WORDS, n))


def lookalike_url(brand: Brand, kind: str, rng: random.Random) -> str:
    """A URL of the kind phishing campaigns use for `brand`."""
    domain = brand.domains[0]
    tld = rng.choice(_TLDS)
    path = rng.choice(("/", "/signin", "/login.php", "/account/verify/", "/secure/index.html",
                       f"/webapps/{rng.randrange(16**5):05x}/signin", "/auth/session"))
    if kind == "hyphen":  # paypal.com-resolution-center.info
        host = f"{domain}-{_words(rng, 1)}.{tld}"
    elif kind == "subdomain":  # accounts.google.com.signin-verify.net
        host = f"{brand.login_host}.{_words(rng, 2)}.{tld}"
    elif kind == "combo":  # netflix-billing-update.net
        host = f"{brand.label}-{_words(rng, rng.choice((1, 2)))}.{tld}"
    elif kind == "typo":  # paypa1.com
        host = f"{_typo(brand.label, rng)}.{domain.split('.', 1)[1]}"
    elif kind == "homoglyph":  # paypal.com with a Cyrillic a for one a
        host = f"{_homoglyph(brand.label, rng)}.{domain.split('.', 1)[1]}"
    else:  # a compromised small site carrying the kit under a path naming the brand
        host = rng.choice(_COMPROMISED)
        path = rng.choice((f"/wp-content/uploads/{brand.key}/{_words(rng, 1)}/",
                           f"/.well-known/{brand.key}.com/signin/",
                           f"/images/{brand.key}-{_words(rng, 1)}/index.php"))
    # Most phishing now has a valid certificate; some still runs on plain http.
    scheme = "https" if rng.random() < 0.6 else "http"
    return f"{scheme}://{host}{path}"


HOST_KINDS = ("hyphen", "subdomain", "combo", "typo", "homoglyph", "path")

# --- page parts ---------------------------------------------------------------------------------

_ANALYTICS = """<script async src="https://www.googletagmanager.com/gtag/js?id=G-{gid}"></script>
<script>window.dataLayer=window.dataLayer||[];function gtag(){{dataLayer.push(arguments);}}
gtag('js',new Date());gtag('config','G-{gid}');</script>"""

# Google Tag Manager's standard snippet: a hidden iframe for visitors without JavaScript, on a
# large share of ordinary sites.
_GTM_NOSCRIPT = ('<noscript><iframe src="https://www.googletagmanager.com/ns.html?id=GTM-{gid}" '
                 'height="0" width="0" style="display:none;visibility:hidden"></iframe>'
                 "</noscript>")


def _esc(s: str) -> str:
    return html.escape(s, quote=True)


def _head(title: str, extra: str = "") -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_esc(title)}</title>\n{extra}</head>\n")


def _brand_head(b: Brand, title: str, rng: random.Random, own: bool) -> str:
    """Icons, styles and social tags as a brand's page (or a clone of it) has them. Clones
    either hot-link the brand's assets or carry copies next to the kit."""
    hotlink = own or rng.random() < 0.6
    base = f"https://{b.assets}" if hotlink else "assets"
    parts = [f'<link rel="icon" href="{base}/favicon.ico">',
             f'<link rel="stylesheet" href="{base}/css/{b.key}-signin.css">']
    if own or rng.random() < 0.4:
        parts.append(f'<meta property="og:site_name" content="{_esc(b.name)}">')
        parts.append(f'<meta property="og:image" content="https://{b.assets}/img/{b.key}-og.png">')
    if own:
        parts.append(f'<link rel="canonical" href="https://{b.login}">')
        parts.append(_ANALYTICS.format(gid=hashlib.md5(b.key.encode()).hexdigest()[:10].upper()))
    return _head(title, "\n".join(parts) + "\n")


def _logo(b: Brand, rng: random.Random, own: bool) -> str:
    src = (f"https://{b.assets}/img/{b.key}-logo.svg" if own or rng.random() < 0.6
           else rng.choice(("images/logo.png", "assets/img/lg.svg", "files/logo_2x.png")))
    return f'<img class="logo" src="{src}" alt="{_esc(b.name)}" width="120">'


def _footer(b: Brand) -> str:
    """Kits keep the brand's footer, links to the brand's real pages included."""
    d = b.domains[0]
    return (f'<footer><a href="https://www.{d}/legal/privacy">Privacy</a> · '
            f'<a href="https://www.{d}/legal">Legal</a> · <a href="https://www.{d}/help">Help'
            f'</a><p>© 2024 {_esc(b.name)}. All rights reserved.</p></footer>')


def _name(b: Brand, rng: random.Random) -> str:
    return rng.choice((b.name, b.name, *b.aliases))


_PW_TITLES = ("Log in to your {n} account", "{n} - Sign In", "Sign in to {n}", "{n}: Login",
              "{n} Account Verification", "Sign in | {n}", "{n} | Secure Login")
_PW_HEADINGS = ("Sign in", "Log in to {n}", "Welcome back", "Verify your identity",
                "Confirm your {n} account", "Sign in to continue to {n}")
_LURES = ("We noticed unusual activity in your account. Please confirm your information to "
          "restore full access.", "Your account has been temporarily limited.",
          "For your security, please sign in again.", "Your session has expired.",
          "We could not verify your recent payment. Sign in to review it.",
          "Action required: your account will be suspended within 24 hours.")
_BUTTONS = ("Log In", "Sign in", "Next", "Continue", "Verify", "Submit")


def _action(rng: random.Random) -> str:
    """Where a kit sends what it collects: a script beside it, or another host entirely."""
    return rng.choice(("login.php", "next.php", "post.php", "send.php", "auth/verify.php",
                       f"http://{_words(rng, 1)}-{rng.randrange(100, 999)}.{rng.choice(_TLDS)}"
                       f"/gate.php", "https://formspree.io/f/xq" + f"{rng.randrange(16**6):06x}"))


def _email_field(rng: random.Random) -> str:
    return rng.choice(('<input type="email" name="email" placeholder="Email or phone" required>',
                       '<input type="text" name="login_email" placeholder="Email address">',
                       '<input type="text" name="username" autocomplete="username" '
                       'placeholder="Email, phone, or username">'))


def _password_field(rng: random.Random) -> str:
    return rng.choice(('<input type="password" name="password" placeholder="Password" required>',
                       '<input type="password" name="pass" autocomplete="current-password">',
                       '<input type="password" name="login_password" placeholder="Password">'))


def _card_fields(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return ('<input name="ccname" autocomplete="cc-name" placeholder="Name on card">'
                '<input name="cardnumber" autocomplete="cc-number" inputmode="numeric" '
                'placeholder="Card number">'
                '<input name="exp" autocomplete="cc-exp" placeholder="MM / YY">'
                '<input name="cvc" autocomplete="cc-csc" placeholder="CVV">')
    return ('<label>Cardholder name <input name="holder"></label>'
            '<label>Card number <input name="ccnum" maxlength="19"></label>'
            '<label>Expiry date <input name="expdate" placeholder="MM/YY"></label>'
            '<label>Security code (CVV) <input name="cvv" maxlength="4"></label>')


def _otp_field(rng: random.Random) -> str:
    name = rng.choice(("otp", "code", "sms_code", "verification_code"))
    auto = ' autocomplete="one-time-code"' if rng.random() < 0.6 else ""
    return (f'<input name="{name}" inputmode="numeric" maxlength="6"{auto} '
            f'placeholder="Enter 6-digit code">')


# --- phishing styles ----------------------------------------------------------------------------

PageBody = Callable[[Brand, random.Random], str]


def _page(b: Brand, title: str, body: str, rng: random.Random, own: bool = False) -> str:
    return (_brand_head(b, title, rng, own) + f"<body><div class=\"wrap\">{_logo(b, rng, own)}"
            f"\n{body}\n</div>{_footer(b)}</body></html>\n")


def phish_clone(b: Brand, rng: random.Random) -> str:
    n = _name(b, rng)
    form = (f'<form method="post" action="{_action(rng)}">{_email_field(rng)}'
            f'{_password_field(rng)}<button type="submit">{rng.choice(_BUTTONS)}</button>'
            f'<a href="#">Forgot password?</a></form>')
    body = (f"<h1>{_esc(rng.choice(_PW_HEADINGS).format(n=n))}</h1>"
            f"<p class=\"notice\">{_esc(rng.choice(_LURES))}</p>{form}")
    return _page(b, rng.choice(_PW_TITLES).format(n=n), body, rng)


def phish_two_step(b: Brand, rng: random.Random) -> str:
    """E-mail first; the password box is on the same page, shown by script after "Next"."""
    n = _name(b, rng)
    hidden_pw = (f'<div id="pwd-step" style="display:none">{_password_field(rng)}</div>'
                 if rng.random() < 0.6 else "")
    form = (f'<form id="f" method="post" action="{_action(rng)}">'
            f'<h2>{_esc(rng.choice(("Sign in", "Enter your email", "Sign in to continue")))}</h2>'
            f'{_email_field(rng)}{hidden_pw}<button type="submit">Next</button></form>'
            "<script>document.getElementById('f').onsubmit=function(e){var p=document."
            "getElementById('pwd-step');if(p&&p.style.display=='none'){e.preventDefault();"
            "p.style.display='block';}};</script>")
    title = rng.choice(("Sign in to your account", "{n} - Sign in", "Sign in - {n}",
                        "{n} account")).format(n=n)
    return _page(b, title, f"<p>{_esc(n)}</p>{form}", rng)


def phish_card(b: Brand, rng: random.Random) -> str:
    n = _name(b, rng)
    parcel = b.key in ("dhl", "usps", "fedex", "ups")
    title = (rng.choice(("{n}: Your parcel is on hold", "{n} - Pay customs fee",
                         "{n} Delivery - Action required")) if parcel else
             rng.choice(("{n} - Update billing information", "Confirm your payment method | {n}",
                         "{n}: Payment declined", "Update your payment details - {n}")))
    lure = (f"Your parcel could not be delivered. Pay the customs fee of "
            f"{rng.choice(('1.99', '2.99', '3.49'))} EUR to release it." if parcel else
            "We were unable to process your last payment. Update your card to keep your "
            "account active.")
    form = (f'<form method="post" action="{_action(rng)}">{_card_fields(rng)}'
            f'<button type="submit">{rng.choice(("Pay now", "Update", "Confirm"))}</button>'
            "</form>")
    return _page(b, title.format(n=n), f"<h1>{_esc(title.format(n=n))}</h1><p>{_esc(lure)}"
                                       f"</p>{form}", rng)


def phish_otp(b: Brand, rng: random.Random) -> str:
    n = _name(b, rng)
    title = rng.choice(("{n} - Two-step verification", "Enter security code | {n}",
                        "{n}: Confirm it's you", "{n} Secure Verification")).format(n=n)
    form = (f'<form method="post" action="{_action(rng)}"><p>We sent a code to your phone '
            f'number ending in **{rng.randrange(10, 99)}.</p>{_otp_field(rng)}'
            f'<button type="submit">{rng.choice(("Verify", "Confirm", "Continue"))}</button>'
            "</form>")
    return _page(b, title, f"<h1>{_esc(title)}</h1>{form}", rng)


def phish_obfuscated(b: Brand, rng: random.Random) -> str:
    """The form is written by script from an encoded string: without JavaScript only the title,
    the script and perhaps a logo are visible."""
    n = _name(b, rng)
    form = (f'<h1>Sign in to {_esc(n)}</h1><form method="post" action="{_action(rng)}">'
            f'{_email_field(rng)}{_password_field(rng)}<button>Sign in</button></form>')
    enc = rng.choice(("atob", "unescape", "charcode"))
    if enc == "atob":
        script = f'document.write(atob("{base64.b64encode(form.encode()).decode()}"));'
    elif enc == "unescape":
        script = f"document.write(unescape('{urllib.parse.quote(form, safe='')}'));"
    else:
        codes = ",".join(str(ord(c)) for c in form)
        script = f"var _0x1a=[{codes}];document.write(String.fromCharCode.apply(null,_0x1a));"
    logo = _logo(b, rng, False) if rng.random() < 0.5 else ""
    title = rng.choice(_PW_TITLES).format(n=n)
    return (_head(title, '<link rel="icon" href="favicon.ico">\n')
            + f"<body>{logo}<script>{script}</script><noscript>Please enable JavaScript to "
              f"continue.</noscript></body></html>\n")


def phish_kit_link(b: Brand, rng: random.Random) -> str:
    """A lure page with no form: it only sends the visitor on to the kit."""
    n = _name(b, rng)
    kit = lookalike_url(b, rng.choice(("hyphen", "subdomain", "combo")), rng)
    title = rng.choice(("{n} - Account suspended", "{n}: Important notice about your account",
                        "Your {n} account is on hold", "{n} Security Alert")).format(n=n)
    body = (f"<h1>{_esc(title)}</h1><p>{_esc(rng.choice(_LURES))}</p>"
            f'<p><a class="btn" href="{kit}">'
            f'{rng.choice(("Restore access", "Verify now", "Log in"))}</a></p>')
    return _page(b, title, body, rng)


PHISH_STYLES: dict[str, PageBody] = {
    "clone": phish_clone, "two_step": phish_two_step, "card": phish_card, "otp": phish_otp,
    "obfuscated": phish_obfuscated, "kit_link": phish_kit_link,
}
_FLOW_STYLE = {"password": "clone", "card": "card", "otp": "otp"}

# --- benign pages -------------------------------------------------------------------------------


def _app_scripts(b: Brand, rng: random.Random) -> str:
    """What real sign-in pages carry: a bundled app from the brand's CDN and inline state with
    a long random token (CSRF, flow id), which is neither obfuscation nor a payload."""
    token = base64.b64encode(rng.randbytes(rng.choice((96, 192, 288)))).decode()
    bundle = hashlib.sha256(b.key.encode()).hexdigest()[:12]
    return (f'<input type="hidden" name="csrf_token" value="{token[:64]}">'
            f'<script src="https://{b.assets}/js/signin.{bundle}.js" defer></script>'
            f'<script>window.__INITIAL_STATE__={{"flow":"login","locale":"en-US",'
            f'"token":"{token}","features":{{"passkeys":true,"captcha":false}}}};</script>')


def own_login(b: Brand, rng: random.Random) -> str:
    """The brand's own sign-in page at its own domain (posting to itself or a sister domain)."""
    n = b.name
    target = rng.choice((f"https://{b.login}", f"https://{b.login_host}/session",
                         f"https://{rng.choice(b.domains)}/login/verify"))
    if b.flow == "card" and rng.random() < 0.5:
        fields = _card_fields(rng)
        heading = "Update your payment method"
    elif b.flow == "otp" and rng.random() < 0.5:
        fields = _otp_field(rng)
        heading = "Enter the code we sent you"
    else:
        fields = _email_field(rng) + _password_field(rng)
        heading = rng.choice(_PW_HEADINGS).format(n=n)
    body = (f"<h1>{_esc(heading)}</h1><form method=\"post\" action=\"{target}\">{fields}"
            f"<button type=\"submit\">{rng.choice(_BUTTONS)}</button></form>"
            f'<p><a href="https://{b.login_host}/help">Need help signing in?</a></p>'
            + _app_scripts(b, rng))
    return _page(b, rng.choice(_PW_TITLES[:3]).format(n=n), body, rng, own=True)


_SITES = (("riverside-library.org", "Riverside Public Library", "Library account"),
          ("greenleaf-gardening.com", "Greenleaf Gardening", "Member login"),
          ("forum.cyclingtalk.net", "CyclingTalk Forum", "Log in to the forum"),
          ("portal.northwood-school.edu", "Northwood School Portal", "Parent and student login"),
          ("shop.handmade-ceramics.co.uk", "Handmade Ceramics", "Your account"),
          ("members.citygym.fit", "City Gym", "Members area"),
          ("app.invoicely-books.io", "Invoicely", "Sign in to Invoicely"),
          ("mail.brightwave-isp.net", "Brightwave Webmail", "Webmail login"),
          ("intranet.acme-logistics.com", "ACME Logistics Intranet", "Staff sign-in"),
          ("my.springfield-utilities.gov", "Springfield Utilities", "Pay your bill online"),
          ("tickets.jazzfest-montreux.ch", "Jazz Festival Tickets", "Sign in to buy tickets"),
          ("account.pixelforge-games.com", "PixelForge Games", "Sign in to PixelForge"),
          ("dashboard.cloudnest-hosting.com", "CloudNest Hosting", "Customer dashboard"),
          ("learn.codecampus.dev", "CodeCampus", "Log in to continue learning"),
          ("booking.alpine-lodge.at", "Alpine Lodge", "Manage your booking"),
          ("secure.harbor-credit-union.org", "Harbor Credit Union", "Online banking login"),
          ("wiki.opensource-collective.org", "Collective Wiki", "Log in"),
          ("www.pawsandclaws-vet.com", "Paws & Claws Vet", "Client portal"),
          ("crm.salesgrid.app", "SalesGrid", "Sign in to your workspace"),
          ("store.vintagevinyl.shop", "Vintage Vinyl", "Checkout: sign in or pay"),
          # Real organisations whose names contain a brand's (apple, citi, ups, steam, amazon):
          # a look-alike rule must not take them for the brand.
          ("www.applebees.com", "Applebee's", "Sign in to Club Applebee's"),
          ("www.citizensbank.com", "Citizens Bank", "Online banking login"),
          ("www.upstart.com", "Upstart", "Sign in to Upstart"),
          ("www.appletonlibrary.org", "Appleton Public Library", "My library account"),
          ("www.steamboatpilot.com", "Steamboat Pilot & Today", "Subscriber login"),
          ("www.amazonia-expeditions.com", "Amazonia Expeditions", "Manage your booking"),
          # Webmail logins at the providers' own domains, beside the webmail kits above.
          ("webmail.northfield.ac.uk", "Northfield College Webmail", "Webmail login"),
          ("mail.hostingpoint.net", "HostingPoint", "Roundcube Webmail login"))


def ordinary_login(site: tuple[str, str, str], rng: random.Random) -> str:
    host, name, heading = site
    card = "Pay" in heading or "Checkout" in heading
    fields = (_card_fields(rng) if card else _email_field(rng) + _password_field(rng))
    if "banking" in heading and rng.random() < 0.5:
        fields += _otp_field(rng)
    action = rng.choice((f"https://{host}/login", "/session", f"https://{host}/auth?next=%2F"))
    nav = "".join(f'<a href="/{p}">{p.title()}</a> ' for p in ("home", "about", "contact"))
    return (_head(f"{heading} - {name}", '<link rel="icon" href="/favicon.ico">\n'
                  '<link rel="stylesheet" href="/static/site.css">\n'
                  + _ANALYTICS.format(gid=hashlib.md5(host.encode()).hexdigest()[:10].upper())
                  + "\n")
            + "<body>" + (_GTM_NOSCRIPT.format(gid=host[:6].upper().replace(".", "X"))
                          if rng.random() < 0.5 else "")
            + f"<header><img src=\"/static/logo.png\" alt=\"{_esc(name)}\">{nav}</header>"
              f"<main><h1>{_esc(heading)}</h1><form method=\"post\" action=\"{action}\">{fields}"
              f"<button type=\"submit\">{rng.choice(('Sign in', 'Log in', 'Continue'))}</button>"
              f"</form><p><a href=\"/register\">Create an account</a></p></main>"
              f"<footer>© 2024 {_esc(name)}</footer></body></html>\n")


def mentions_page(b: Brand, site: tuple[str, str, str], rng: random.Random) -> str:
    """A page that shows a brand without pretending to be it: an article about it, a checkout
    paying with it, a sign-in with it, a help page with its screenshots."""
    host, name, _ = site
    kind = rng.choice(("article", "checkout", "sso", "howto"))
    d = b.domains[0]
    if kind == "article":
        title = f"{b.name} outage: what happened and what to do - {name}"
        main = (f"<h1>{_esc(b.name)} users report sign-in problems</h1><p>Users of "
                f"{_esc(b.name)} could not log in for several hours on Tuesday. {_esc(b.name)} "
                f"said the problem was fixed. <a href=\"https://www.{d}/status\">Status page"
                f"</a>.</p><img src=\"/img/{b.key}-logo-news.jpg\" alt=\"{_esc(b.name)} logo\">")
    elif kind == "checkout":
        title = f"Checkout - {name}"
        main = (f"<h1>Checkout</h1><form method=\"post\" action=\"/checkout/pay\">"
                f"<input name=\"email\" type=\"email\" placeholder=\"Email for receipt\">"
                f"<button name=\"method\" value=\"{b.key}\">Pay with {_esc(b.name)}</button>"
                f"</form><p><img src=\"https://{b.assets}/img/{b.key}-button.svg\" "
                f"alt=\"{_esc(b.name)}\"></p>")
    elif kind == "sso":
        title = f"Sign in - {name}"
        main = (f"<h1>Sign in to {_esc(name)}</h1><form method=\"post\" action=\"/login\">"
                f"{_email_field(rng)}{_password_field(rng)}<button>Sign in</button></form>"
                f"<p>or</p><a class=\"sso\" href=\"https://{b.login_host}/o/oauth2/auth?"
                f"client_id=123&amp;redirect_uri=https%3A%2F%2F{host}%2Fcb\">Sign in with "
                f"{_esc(b.name)}</a>")
    else:
        title = f"How to reset your {b.name} password - {name}"
        main = (f"<h1>How to reset your {_esc(b.name)} password</h1><ol><li>Go to the "
                f"<a href=\"https://{b.login}\">{_esc(b.name)} sign-in page</a>.</li><li>Click "
                f"\"Forgot password\".</li></ol><img src=\"/img/{b.key}-login-screenshot.png\" "
                f"alt=\"{_esc(b.name)} login page\">")
    return (_head(title, '<link rel="stylesheet" href="/static/site.css">\n')
            + "<body>" + (_GTM_NOSCRIPT.format(gid=host[:6].upper().replace(".", "X"))
                          if rng.random() < 0.5 else "")
            + f"<header><a href=\"/\">{_esc(name)}</a></header><main>{main}</main>"
              f"<footer>© 2024 {_esc(name)}</footer></body></html>\n")


# --- generic webmail phishing -------------------------------------------------------------------
# The commonest kit of all impersonates no big brand: "your mailbox is full" in front of a
# Roundcube/cPanel-style login, the victim's address often filled in from the link. The same
# software's login page is, legitimately, on every provider's own domain (see _SITES).

_WEBMAIL_URLS = ("https://mailbox-quota-upgrade.com/?email=j.smith@acme-logistics.com",
                 "http://webmail-verify-account.net/roundcube/",
                 "https://secure-mailbox-update.online/owa/auth/logon.aspx",
                 "https://oakridge-realty.com/wp-includes/webmail/index.php",
                 "http://mail.server-quota-alert.info/cpsess8841/webmail/")


def phish_webmail(rng: random.Random) -> str:
    product = rng.choice(("Roundcube Webmail", "Webmail", "cPanel Webmail", "Outlook Web App"))
    title = rng.choice(("{p} :: Welcome to {p}", "{p} Login", "{p} - Mailbox verification"))
    title = title.format(p=product)
    form = (f'<form method="post" action="{_action(rng)}"><input name="_user" '
            f'placeholder="Email address" value="j.smith@acme-logistics.com">'
            f'{_password_field(rng)}<button type="submit">Login</button></form>')
    body = (f"<h1>{_esc(product)}</h1><p>Your mailbox has exceeded its storage limit. Log in "
            "to verify your account and upgrade your quota, or new mail will be rejected.</p>"
            + form)
    return _head(title, '<link rel="icon" href="skins/elastic/images/favicon.ico">\n') + (
        f"<body>{body}</body></html>\n")


# --- the synthetic set --------------------------------------------------------------------------

PHISH_PER_BRAND = 5


def _rng(page_id: str) -> random.Random:
    return random.Random(hashlib.sha256(page_id.encode()).digest())


def _phish_variants(i: int, b: Brand) -> Iterator[tuple[str, str]]:
    """(style, host kind) for a brand's phishing pages: its typical flow first, then the other
    styles and host kinds in turn, offset per brand so every pair occurs across brands."""
    styles = list(PHISH_STYLES)
    first = _FLOW_STYLE[b.flow]
    order = [first] + [s for s in styles[i % len(styles):] + styles[:i % len(styles)]
                       if s != first]
    for j in range(PHISH_PER_BRAND):
        yield order[j], HOST_KINDS[(i + j) % len(HOST_KINDS)]


def synthetic_pages() -> list[Page]:
    pages: list[Page] = []
    for i, b in enumerate(BRANDS):
        group = f"brand:{b.key}"  # a brand's pages stay together: tuned brands are not reported
        for style, kind in _phish_variants(i, b):
            pid = f"synthetic/phish/{b.key}/{style}/{kind}"
            rng = _rng(pid)
            url = lookalike_url(b, kind, rng)
            pages.append(Page(pid, "phish", "synthetic", url,
                              PHISH_STYLES[style](b, rng).encode(), b.key, style, group))
        pid = f"synthetic/benign/{b.key}/own_login"
        pages.append(Page(pid, "benign", "synthetic", f"https://{b.login}",
                          own_login(b, _rng(pid)).encode(), b.key, "own_login", group))
    for j, site in enumerate(_SITES):
        pid = f"synthetic/benign/site/{site[0]}"
        scheme = "http" if j % 5 == 4 else "https"  # a few small sites still lack TLS
        pages.append(Page(pid, "benign", "synthetic", f"{scheme}://{site[0]}/login",
                          ordinary_login(site, _rng(pid)).encode(), None, "ordinary_login",
                          f"site:{site[0]}"))
        b = BRANDS[(j * 7) % len(BRANDS)]
        pid = f"synthetic/benign/site/{site[0]}/mentions-{b.key}"
        pages.append(Page(pid, "benign", "synthetic", f"https://{site[0]}/{b.key}-page",
                          mentions_page(b, site, _rng(pid)).encode(), b.key, "mentions",
                          f"site:{site[0]}"))
    for k, url in enumerate(_WEBMAIL_URLS):
        pid = f"synthetic/phish/webmail/{k}"
        pages.append(Page(pid, "phish", "synthetic", url, phish_webmail(_rng(pid)).encode(),
                          None, "webmail", pid))  # no brand: each page its own group
    return pages


def all_pages(corpus: Path | None) -> list[Page]:
    """Synthetic pages, then the shared corpus's when `corpus` holds one."""
    return synthetic_pages() + (shared_pages(corpus) if corpus else [])


def dump_index(pages: list[Page]) -> str:
    """A short listing for humans (`python -m bench.verdict_pages`)."""
    return json.dumps([{"id": p.id, "label": p.label, "url": p.url, "split": p.split}
                       for p in pages], indent=1, ensure_ascii=False)


if __name__ == "__main__":
    print(dump_index(synthetic_pages()))
