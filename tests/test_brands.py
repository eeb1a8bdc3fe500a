"""Unit tests for safeurl_worker.brands: the catalogue file, presence and look-alike hosts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from safeurl_worker import brands
from safeurl_worker.analysis import analyze
from safeurl_worker.brands import Catalogue, CatalogueError, load_catalogue
from safeurl_worker.config import ConfigError
from safeurl_worker.models import Features, Form, Image, PageMeta, Report

SHIPPED = Path(brands.__file__).parent / "data" / "brands.json"


@pytest.fixture(scope="module")
def cat() -> Catalogue:
    return load_catalogue()


def page(url: str = "https://kit.example.net/", title: str | None = None, **kw: Any) -> Report:
    return Report(fetcher_version="test", requested_url=url, final_url=url, http_status=200,
                  title=title, features=Features(parse="full", **kw))


def claimed(cat: Catalogue, report: Report) -> list[str]:
    return [c.brand.id for c in cat.presented(report)]


# --- the catalogue file ---------------------------------------------------------------------


def test_shipped_catalogue_is_large_and_covers_every_category(cat: Catalogue) -> None:
    assert len(cat) >= 150
    categories = {b.category for b in cat.brands}
    assert {"payment", "bank", "cloud", "webmail", "social", "shipping", "streaming", "crypto",
            "telecom", "government"} <= categories
    ids = [b.id for b in cat.brands]
    assert len(ids) == len(set(ids))


def test_domains_are_reduced_to_registrable_domains(cat: Catalogue) -> None:
    aws = next(b for b in cat.brands if b.id == "aws")
    assert "amazon.com" in aws.domains  # written as aws.amazon.com
    assert all(d == d.lower() and not d.startswith("www.") for b in cat.brands
               for d in b.domains)


def test_ownership(cat: Catalogue) -> None:
    paypal = next(b for b in cat.brands if b.id == "paypal")
    assert cat.owns(paypal, "www.paypal.com")
    assert cat.owns(paypal, "www.paypalobjects.com")  # an asset domain
    assert not cat.owns(paypal, "paypal.com.evil.test")
    assert [b.id for b in cat.owners("accounts.google.com")] == ["google"]


def test_same_organisation(cat: Catalogue) -> None:
    assert cat.same_organisation("www.example.com", "login.example.com")
    assert cat.same_organisation("www.microsoft.com", "login.microsoftonline.com")
    assert cat.same_organisation("www.example.com", "example.okta.com")  # identity provider
    assert not cat.same_organisation("www.example.com", "collector.evil.test")


def write(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "brands.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


def test_operator_file_adds_and_replaces_brands(tmp_path: Path) -> None:
    path = write(tmp_path, {"version": 1, "identity_providers": ["sso.corp-idp.test"], "brands": [
        {"id": "acmebank", "category": "bank", "names": ["Acme Bank"],
         "domains": ["acmebank.test", "www.acme-online.test"]},
        {"id": "paypal", "names": ["PayPal"], "domains": ["paypal.test"]},
    ]})
    cat = load_catalogue(path)
    acme = next(b for b in cat.brands if b.id == "acmebank")
    assert acme.domains == ["acmebank.test", "acme-online.test"]
    assert acme.lookalike_tokens() == ["acmebank"]
    assert next(b for b in cat.brands if b.id == "paypal").domains == ["paypal.test"]
    assert len(cat) == len(load_catalogue())  + 1
    assert cat.same_organisation("acmebank.test", "sso.corp-idp.test")
    hit = cat.lookalike("https://acmebank-secure-login.test/")
    assert hit is not None and hit.brand.id == "acmebank"


@pytest.mark.parametrize(("doc", "message"), [
    ("{not json", "not valid JSON"),
    ({"version": 2, "brands": []}, "version"),
    ({"version": 1, "brands": [{"id": "x", "names": ["Xco"], "domains": ["not a domain"]}]},
     "not a domain name"),
    ({"version": 1, "brands": [{"id": "Bad Id", "names": ["Xco"], "domains": ["x.test"]}]},
     "brands.0.id"),
    ({"version": 1, "brands": [{"id": "x", "names": [], "domains": ["x.test"]}]}, "names"),
    ({"version": 1, "brands": [{"id": "x", "names": ["Xco"], "domains": ["x.test"],
                                "colour": "red"}]}, "colour"),
])
def test_bad_operator_file_is_a_clear_error(tmp_path: Path, doc: Any, message: str) -> None:
    with pytest.raises(CatalogueError, match=message) as info:
        load_catalogue(write(tmp_path, doc))
    assert str(info.value).startswith("invalid configuration: BRANDS_PATH: ")
    assert isinstance(info.value, ConfigError)


def test_missing_operator_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="cannot read"):
        load_catalogue(tmp_path / "absent.json")


def test_the_operators_catalogue_is_the_one_analyze_uses(tmp_path: Path) -> None:
    """No process-wide catalogue: the worker passes its own (BRANDS_PATH) to every analysis."""
    path = write(tmp_path, {"version": 1, "brands": [
        {"id": "acmebank", "names": ["Acme Bank"], "domains": ["acmebank.test"]}]})
    custom = load_catalogue(path)
    kit = page("https://acme-secure-login.example.net/", title="Acme Bank - Sign in",
               forms=[Form(action="https://acme-secure-login.example.net/p", method="post",
                           has_password=True, has_email=True, text="Acme Bank sign in")])
    assert "acmebank" in claimed(custom, kit)
    with_custom = analyze(kit.requested_url, kit, catalogue=custom)
    shipped = analyze(kit.requested_url, kit)
    assert "brand_impersonation" in {s.name for s in with_custom.signals}
    assert "brand_impersonation" not in {s.name for s in shipped.signals}
    assert brands.shipped_catalogue() is brands.shipped_catalogue()  # loaded once


# --- names on word boundaries ---------------------------------------------------------------


def test_names_match_on_word_boundaries(cat: Catalogue) -> None:
    found = {b.id for b, _ in cat.named("Sign in to PayPal or pay with Visa")}
    assert {"paypal", "visa"} <= found
    assert not cat.named("paypalish wordpress ups and downs")  # inside words; lower-case acronym
    assert {b.id for b, _ in cat.named("AT&T Mail")} == {"att"}


def test_ambiguous_names_match_only_as_written(cat: Catalogue) -> None:
    assert not cat.named("an apple a day, a target to hit")
    assert {b.id for b, _ in cat.named("Apple ID")} == {"apple"}


# --- presence: where a name appears ---------------------------------------------------------


@pytest.mark.parametrize("title", ["Log in to your PayPal account", "PayPal: Log in",
                                   "Sign in | PayPal", "PayPal - Konto anmelden"])
def test_sign_in_title_presents_the_brand(cat: Catalogue, title: str) -> None:
    assert claimed(cat, page(title=title)) == ["paypal"]


def test_title_that_only_mentions_a_brand_is_not_a_claim(cat: Catalogue) -> None:
    r = page(title="Google Stadia, Microsoft xCloud, Apple Arcade: so many ways to play",
             headings=["Google Stadia, Microsoft xCloud, Apple Arcade"],
             text="Google " * 10 + "Apple Microsoft",
             images=[Image(src="https://news.test/i/google.jpg", alt="Google logo")],
             meta=PageMeta(og_site_name="WSJ"))
    assert claimed(cat, r) == []


def test_article_body_naming_a_brand_is_not_a_claim(cat: Catalogue) -> None:
    text = "PayPal said on Monday that it would buy Honey. " * 5
    assert claimed(cat, page(title="PayPal to buy Honey for $4bn - Business News",
                             text=text)) == []


def test_publisher_tag_page_needs_more_than_a_title(cat: Catalogue) -> None:
    r = page(title="Google - The Verge", headings=["Google"],
             meta=PageMeta(og_site_name="The Verge"))
    assert claimed(cat, r) == []


@pytest.mark.parametrize("features", [
    {"meta": PageMeta(og_site_name="Netflix")},
    {"meta": PageMeta(canonical="https://www.netflix.com/login")},
    {"icons": ["https://assets.nflxext.com/favicon.ico"], "images": [
        Image(src="/img/logo.png", alt="Netflix")]},
    {"forms": [Form(action="https://kit.example.net/p", has_password=True,
                    text="Netflix password")], "images": [Image(src="/lg.png", alt="Netflix")]},
    {"text": "Sign in. © 2024 Netflix, Inc. All rights reserved.",
     "images": [Image(src="/img/netflix-logo.svg")]},
])
def test_identity_evidence(cat: Catalogue, features: dict[str, Any]) -> None:
    """Each kind of identity evidence, alone or with a logo, makes a claim."""
    assert "netflix" in claimed(cat, page(title="Sign In", **features))


def test_a_logo_alone_is_not_a_claim(cat: Catalogue) -> None:
    r = page(title="Checkout", images=[Image(src="/img/paypal-logo.svg", alt="PayPal")],
             buttons=["Pay with PayPal"])
    assert claimed(cat, r) == []


def test_sign_in_with_a_brand_is_not_impersonation(cat: Catalogue) -> None:
    forms = [Form(action="https://shop.test/login", has_password=True,
                  text="Email Password Sign in with Google Continue with Facebook")]
    r = page("https://shop.test/login", title="Sign in - Shop", forms=forms,
             buttons=["Sign in with Google", "Continue with Apple"])
    assert claimed(cat, r) == []


def test_ad_and_widget_hosts_are_not_brand_assets(cat: Catalogue) -> None:
    r = page(title="Sign in", external_scripts=["https://connect.facebook.net/sdk.js"],
             icons=["https://news.test/favicon.ico"])
    claims = cat.presented(r, ad_hosts=frozenset({"connect.facebook.net"}))
    assert claims == []


def test_standard_icon_names_are_not_a_brand(cat: Catalogue) -> None:
    r = page(title="Hong Kong latest - Express",
             icons=["https://news.test/apple-touch-icon-precomposed.png"],
             images=[Image(src="https://news.test/apple-touch-icon.png", alt="")])
    assert claimed(cat, r) == []


# --- look-alike hosts -----------------------------------------------------------------------


@pytest.mark.parametrize(("url", "brand", "kind"), [
    ("https://paypal.com-resolution-center.info/", "paypal", "brand_domain_in_host"),
    ("https://accounts.google.com.signin-verify.net/", "google", "brand_domain_in_host"),
    ("https://appleid.apple.com-verify-account.info/", "apple", "brand_domain_in_host"),
    ("https://amazon-order-verify.com/", "amazon", "brand_in_domain"),
    ("https://icloud-find-my-iphone.com/", "apple", "brand_in_domain"),
    ("https://secure-paypalaccount.net/", "paypal", "brand_in_domain"),
    ("https://netflix.billing-update.example/", "netflix", "brand_in_subdomain"),
    ("https://paypa1.com/", "paypal", "typosquat"),
    ("https://gooogle.com/", "google", "typosquat"),
    ("https://rnicrosoft.com/", "microsoft", "typosquat"),
    ("https://xn--pypal-4ve.com/", "paypal", "homoglyph"),
    ("https://p\u0430yp\u0430l.com/", "paypal", "homoglyph"),
    ("https://smallsite.example/wp/www.paypal.com/signin", "paypal", "brand_domain_in_path"),
])
def test_lookalikes(cat: Catalogue, url: str, brand: str, kind: str) -> None:
    hit = cat.lookalike(url)
    assert hit is not None, url
    assert (hit.brand.id, hit.kind) == (brand, kind)


@pytest.mark.parametrize("url", [
    "https://www.paypal.com/signin", "https://accounts.google.com/", "https://www.nytimes.com/",
    "https://www.stripes.com/", "https://www.outlookindia.com/", "https://www.pineapple.test/",
    "https://www.theverge.com/google", "https://www.wsj.com/articles/google-stadia",
    "https://192.0.2.7/", "https://[2001:db8::1]/", "https://purchase.example/",
    "not a url",
])
def test_not_lookalikes(cat: Catalogue, url: str) -> None:
    assert cat.lookalike(url) is None


def test_skeleton_reads_confusables_and_digits() -> None:
    assert brands._skeleton("p\u0430yp\u0430l") == "paypal"  # Cyrillic a
    assert brands._skeleton("g00gle") == "google"
    assert brands._skeleton("rnicrosoft") == "microsoft"


def test_uts46_display_of_xn_labels() -> None:
    assert brands._unicode_label("xn--pypal-4ve") == "p\u0430ypal"
    assert brands._unicode_label("xn--zz-not-valid") == "xn--zz-not-valid"


def test_brands_of_one_owner_are_one_organisation(cat: Catalogue) -> None:
    """AOL's sign-in page loads Yahoo's assets and may say Yahoo: one organisation. The same
    page anywhere else is still Yahoo's look-alike."""
    def yahoo_page(url: str) -> Report:
        return page(url, title="Yahoo - login",
                    stylesheets=["https://s.yimg.com/login/main.css"],
                    icons=["https://s.yimg.com/rz/l/favicon.ico"],
                    forms=[Form(action=url + "login", method="post", has_password=True,
                                has_email=True, text="Yahoo sign in")])
    at_aol = yahoo_page("https://login.aol.com/")
    elsewhere = yahoo_page("https://login.example.net/")
    assert "yahoo" in claimed(cat, at_aol) and "yahoo" in claimed(cat, elsewhere)
    yahoo = next(b for b in cat.brands if b.id == "yahoo")
    assert cat.owns(yahoo, "login.aol.com") and not cat.owns(yahoo, "login.example.net")
    names = {s.name for s in analyze(at_aol.requested_url, at_aol).signals}
    assert "brand_impersonation" not in names
    names = {s.name for s in analyze(elsewhere.requested_url, elsewhere).signals}
    assert "brand_impersonation" in names


def test_self_hosted_software_on_its_users_domains_is_not_impersonation(cat: Catalogue) -> None:
    """Roundcube and cPanel log-ins live on every hosting provider's own domain."""
    url = "https://mail.hosting-provider.example/"
    login = page(url, title="Roundcube Webmail :: Welcome to Roundcube Webmail",
                 meta=PageMeta(application_name="Roundcube Webmail"),
                 forms=[Form(action=url + "?_task=login", method="post", has_password=True,
                             has_email=True, text="Username Password Login")])
    assert "roundcube" in claimed(cat, login)
    assert analyze(url, login).signals == []


def test_a_governments_suffix_owns_every_name_under_it_and_a_platforms_owns_none(
        cat: Catalogue) -> None:
    hmrc = next(b for b in cat.brands if "gov.uk" in b.domains)
    assert cat.owns(hmrc, "www.access.service.gov.uk")  # only the government registers there
    assert cat.lookalike("https://www.access.service.gov.uk/login") is None
    github = next(b for b in cat.brands if b.id == "github")
    assert not cat.owns(github, "octocat.github.io")  # anyone gets a name there
    assert cat.lookalike("https://octocat.github.io/") is None  # a real subdomain, no look-alike
    kit = page("https://octocat.github.io/login", title="Sign in to GitHub",
               forms=[Form(action="https://collect.example/p", method="post",
                           has_password=True, has_email=True, text="GitHub sign in")])
    assert "github" in claimed(cat, kit)  # GitHub's login on a Pages site is impersonation


@pytest.mark.parametrize("title", ["Pay\u200bPal: Log in to your account",
                                   "Pay\u00adPal: Log in to your account",
                                   "\u0420ayPal: Log in to your account",  # Cyrillic Er
                                   "Micro\u200dsoft account"])
def test_invisible_and_look_alike_letters_do_not_hide_a_brand(cat: Catalogue,
                                                             title: str) -> None:
    assert claimed(cat, page(title=title, forms=[Form(action="https://kit.example.net/p",
                                                      method="post", has_password=True)]))


def test_an_article_or_a_tag_page_about_a_brand_does_not_present_itself_as_it(
        cat: Catalogue) -> None:
    for title in ("PayPal - Wikipedia", "Netflix | The Verge"):
        assert claimed(cat, page(title=title, headings=[title.split()[0]],
                                 text=f"{title.split()[0]} raised its prices.")) == [], title
    assert claimed(cat, page(title="PayPal: Log in")) == ["paypal"]


def test_a_decoy_site_name_does_not_hide_a_kit(cat: Catalogue) -> None:
    kit = page(title="Log in to your PayPal account", meta=PageMeta(og_site_name="Secure Portal"),
               forms=[Form(action="https://kit.example.net/p", method="post", has_password=True,
                           has_email=True)])
    assert claimed(cat, kit) == ["paypal"]


def test_a_brands_user_content_hosts_are_not_the_brand(cat: Catalogue) -> None:
    """A Microsoft sign-in clone on an attacker's SharePoint site, or a Google one on a Google
    Site, is impersonation; the brand's own sign-in hosts are still its own."""
    microsoft = next(b for b in cat.brands if b.id == "microsoft")
    assert cat.owns(microsoft, "login.microsoftonline.com")
    assert not cat.owns(microsoft, "contoso-my.sharepoint.com")
    assert cat.lookalike("https://contoso-my.sharepoint.com/") is None  # not a look-alike host
    for url, title in (("https://contoso-my.sharepoint.com/sites/x/", "Sign in to your account"
                        " - Microsoft 365"),
                       ("https://sites.google.com/view/x", "Sign in - Google Accounts")):
        clone = page(url, title=title, forms=[Form(action="https://collect.example/p",
                                                   method="post", has_password=True)])
        names = {s.name for s in analyze(url, clone).signals}
        assert "brand_impersonation" in names, url
