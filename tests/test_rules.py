"""Unit tests for safeurl_worker.rules: the registry, brand impersonation, look-alike domains
and the false-alarm rules. Reports are built directly, no network."""

from __future__ import annotations

from typing import Any

import pytest

from safeurl_worker import rules
from safeurl_worker.analysis import analyze
from safeurl_worker.brands import shipped_catalogue
from safeurl_worker.models import (
    Analysis,
    Features,
    Form,
    Iframe,
    Image,
    PageMeta,
    RedirectHop,
    Refusal,
    Render,
    RenderHop,
    RenderRequest,
    Report,
    ReportError,
    ScriptStats,
    Signal,
    TlsInfo,
    Verdict,
)
from safeurl_worker.rules import RULES, Context

KIT = "https://account-review.example.net/signin/"


def report(url: str = KIT, title: str | None = None, **features: Any) -> Report:
    return Report(fetcher_version="test", requested_url=url, final_url=url, http_status=200,
                  content_type="text/html", body_size=4000, title=title,
                  tls=TlsInfo(verified=True) if url.startswith("https") else None,
                  features=Features(**{"parse": "full", "text": "Welcome", "links_count": 5,
                                       **features}))


def run(name: str, url: str, r: Report) -> list[Signal]:
    ctx = Context(url=url, report=r, blocklist=None, catalogue=shipped_catalogue())
    return list(RULES[name].check(ctx))


def only(result: Analysis, name: str) -> Signal:
    found = [s for s in result.signals if s.name == name]
    assert len(found) == 1, result.signals
    return found[0]


def password_form(action: str = "https://account-review.example.net/post.php", **kw: Any
                  ) -> Form:
    return Form(action=action, method="post", has_password=True, has_email=True, **kw)


# --- the registry ---------------------------------------------------------------------------


def test_registry_records_name_weight_description_and_check() -> None:
    info = RULES["lookalike_domain"]
    assert info.check is rules.lookalike_domain
    assert info.url_level and info.weight == rules.LOOKALIKE_CREDENTIALS_WEIGHT
    assert all(r.weight > 0 and len(r.description) > 20 for r in RULES.values())
    assert next(iter(RULES)) == "blocklist_hit"  # registration order is evaluation order


# --- brand impersonation --------------------------------------------------------------------


def test_branded_password_page_on_a_foreign_domain_is_malicious_alone() -> None:
    r = report(title="Log in to your PayPal account", forms=[password_form()])
    result = analyze(KIT, r)
    signal = only(result, "brand_impersonation")
    assert signal.weight == rules.BRAND_CREDENTIALS_WEIGHT
    assert "PayPal" in signal.evidence and "password" in signal.evidence
    assert result.verdict is Verdict.MALICIOUS


@pytest.mark.parametrize(("form", "expected"), [
    (Form(action=KIT, has_card=True), rules.BRAND_CREDENTIALS_WEIGHT),
    (Form(action=KIT, has_otp=True), rules.BRAND_CREDENTIALS_WEIGHT),
    (Form(action=KIT, has_email=True), rules.BRAND_EMAIL_WEIGHT),
    (Form(action=KIT + "search"), rules.BRAND_WEIGHT),
])
def test_brand_weight_follows_what_the_page_asks_for(form: Form, expected: int) -> None:
    r = report(title="Sign in - Netflix", forms=[form])
    assert [s.weight for s in run("brand_impersonation", KIT, r)] == [expected]


def test_brand_lure_without_a_form_is_malicious() -> None:
    r = report(title="Chase: Important notice about your account",
               meta=PageMeta(og_site_name="Chase"), headings=["Your account is on hold"])
    assert run("brand_impersonation", KIT, r)[0].weight == rules.BRAND_CREDENTIALS_WEIGHT


def test_brand_page_written_by_encoded_script_is_malicious() -> None:
    r = report(title="Sign in to your Microsoft account",
               scripts=ScriptStats(inline_count=1, document_write_count=1, atob_count=1))
    signal = run("brand_impersonation", KIT, r)[0]
    assert signal.weight == rules.BRAND_CREDENTIALS_WEIGHT
    assert "encoded script" in signal.evidence


def test_brand_at_its_own_domain_is_not_impersonation() -> None:
    url = "https://www.paypal.com/signin"
    r = report(url, title="Log in to your PayPal account",
               forms=[password_form("https://www.paypal.com/signin")])
    result = analyze(url, r)
    assert result.verdict is Verdict.SAFE and result.signals == []


def test_news_article_about_a_brand_is_safe() -> None:
    url = "https://news.example.org/2024/paypal-results"
    r = report(url, title="PayPal shares jump after results - Example News",
               headings=["PayPal shares jump after results"], text="PayPal " * 20,
               meta=PageMeta(og_site_name="Example News"),
               images=[Image(src="https://news.example.org/i/paypal-logo.jpg",
                             alt="The PayPal logo")],
               forms=[Form(action="https://news.example.org/newsletter", has_email=True)])
    assert analyze(url, r).signals == []


def test_checkout_that_pays_with_a_brand_is_safe() -> None:
    url = "https://shop.example.org/checkout"
    r = report(url, title="Checkout - Example Shop", buttons=["Pay with PayPal"],
               images=[Image(src="https://www.paypalobjects.com/logo.png", alt="PayPal")],
               forms=[password_form("https://shop.example.org/login",
                                    text="Email Password Sign in with Google")])
    result = analyze(url, r)
    assert "brand_impersonation" not in {s.name for s in result.signals}
    assert result.verdict is Verdict.SAFE


# --- look-alike domains ---------------------------------------------------------------------


@pytest.mark.parametrize(("url", "kind"), [
    ("https://paypal.com-resolution-center.info/", "brand_domain_in_host"),
    ("https://accounts.google.com.signin-verify.net/", "brand_domain_in_host"),
    ("https://amazon-order-verify.com/", "brand_in_domain"),
    ("https://paypa1.com/", "typosquat"),
    ("https://xn--pypal-4ve.com/", "homoglyph"),
])
def test_lookalike_domain_weights(url: str, kind: str) -> None:
    signals = run("lookalike_domain", url, report(url))
    assert [s.weight for s in signals] == [rules.LOOKALIKE_WEIGHTS[kind]]
    assert kind.replace("_", " ") in signals[0].evidence


@pytest.mark.parametrize(("url", "escalates"), [
    ("https://paypal.com-resolution-center.info/", True),
    ("https://xn--pypal-4ve.com/", True),
    ("https://amazon-order-verify.com/", False),  # could be a fan site's login
    ("https://paypa1.com/", False),
])
def test_unambiguous_lookalike_asking_for_credentials_is_malicious(url: str,
                                                                   escalates: bool) -> None:
    r = report(url, forms=[password_form(url + "login")])
    weight = run("lookalike_domain", url, r)[0].weight
    assert (weight == rules.LOOKALIKE_CREDENTIALS_WEIGHT) is escalates
    assert (analyze(url, r).verdict is Verdict.MALICIOUS) is escalates


def test_lookalike_of_the_final_url_after_a_redirect() -> None:
    start = "https://short.example/x"
    final = "https://paypal.com-resolution-center.info/"
    r = report(final).model_copy(update={"requested_url": start, "redirects": [
        RedirectHop(url=start, status=302, location=final)]})
    assert run("lookalike_domain", start, r)


def test_phishing_url_with_brand_page_is_malicious_even_over_https() -> None:
    url = "https://paypal.com-resolution-center.info/signin"
    r = report(url, title="Log in to your PayPal account",
               forms=[password_form(url)])
    result = analyze(url, r)
    assert result.verdict is Verdict.MALICIOUS
    assert {"lookalike_domain", "brand_impersonation"} <= {s.name for s in result.signals}


def test_lookalike_alone_on_an_unreachable_host_is_suspicious() -> None:
    url = "https://paypal.com-resolution-center.info/"
    down = Report(fetcher_version="test", requested_url=url,
                  error=ReportError(code="DNS_FAILED"))
    assert analyze(url, down).verdict is Verdict.SUSPICIOUS


# --- fewer false alarms ---------------------------------------------------------------------


ADS = ["https://www.googletagmanager.com/gtm.js?id=GTM-X",
       "https://securepubads.g.doubleclick.net/tag/js/gpt.js"]


def test_ad_tags_halve_and_raise_the_bar_for_obfuscation() -> None:
    url = "https://news.example.org/a"
    stats = ScriptStats(inline_count=20, eval_count=1, document_write_count=3, atob_count=1)
    plain = run("obfuscated_script", url, report(url, scripts=stats))
    with_ads = run("obfuscated_script", url, report(url, scripts=stats, external_scripts=ADS))
    assert plain and plain[0].weight == 8
    assert with_ads == []
    heavy = ScriptStats(eval_count=5, fromcharcode_count=5, long_base64_runs=3)
    packed = run("obfuscated_script", url, report(url, scripts=heavy, external_scripts=ADS))
    assert packed[0].weight == rules.OBFUSCATION_MAX_WEIGHT // 2


@pytest.mark.parametrize("src", [
    "https://www.googletagmanager.com/ns.html?id=GTM-X",  # the tag manager's noscript frame
    "https://tpc.googlesyndication.com/safeframe/1-0-40/html/container.html",
    "about:blank", "javascript:false", "https://news.example.org/sync.html",  # same site
])
def test_ad_and_empty_hidden_iframes_are_not_flagged(src: str) -> None:
    url = "https://news.example.org/a"
    assert run("hidden_iframe", url, report(url, iframes=[Iframe(src=src, hidden=True)])) == []


def test_hidden_iframe_to_an_unknown_site_is_flagged() -> None:
    url = "https://news.example.org/a"
    frames = [Iframe(src="https://www.googletagmanager.com/ns.html", hidden=True),
              Iframe(src="https://exploit.example/k", hidden=True)]
    assert "exploit.example" in run("hidden_iframe", url, report(url, iframes=frames))[0].evidence


@pytest.mark.parametrize(("page", "action"), [
    ("https://www.microsoft.com/en-us/", "https://login.microsoftonline.com/common/login"),
    ("https://mail.google.com/", "https://accounts.google.com/signin"),
    ("https://news.example.org/", "https://news-example.okta.com/login"),  # identity provider
    ("https://news.example.org/", "https://account.example.org/login"),  # same site
])
def test_login_posting_to_the_same_organisation_is_normal(page: str, action: str) -> None:
    r = report(page, forms=[password_form(action)])
    assert run("password_form_cross_domain", page, r) == []


def test_login_posting_to_a_sister_site_the_page_uses_is_weak() -> None:
    url = "https://phys.example.org/news/a"
    forms = [password_form("https://sciencex.example.com/profile/login/"),
             Form(action="https://sciencex.example.com/api/feedback", method="post")]
    signal = run("password_form_cross_domain", url, report(url, forms=forms))[0]
    assert signal.weight == rules.AFFILIATED_FORM_WEIGHT


def test_news_login_to_publisher_sso_plus_script_redirect_is_not_malicious() -> None:
    url = "https://www.news.example/articles/1"
    forms = [password_form("https://sso.accounts.publisher.example/login"),
             Form(action="https://sso.accounts.publisher.example/newsletter")]
    r = report(url, title="Markets today - News", forms=forms,
               js_redirects=["https://sso.accounts.publisher.example/login?target=x"],
               external_scripts=ADS)
    result = analyze(url, r)
    assert result.verdict is not Verdict.MALICIOUS


def test_plain_http_news_page_with_login_box_is_not_suspicious() -> None:
    url = "http://news.example.org/a"
    r = report(url, title="Local news", forms=[password_form("https://news.example.org/login")])
    result = analyze(url, r)
    assert only(result, "password_form_insecure").weight == rules.INSECURE_PAGE_WEIGHT
    assert result.verdict is Verdict.SAFE


def test_password_sent_over_http_stays_suspicious() -> None:
    url = "http://news.example.org/a"
    r = report(url, forms=[password_form("http://news.example.org/login")])
    result = analyze(url, r)
    assert only(result, "password_form_insecure").weight == 35
    assert result.verdict is Verdict.SUSPICIOUS


def test_plain_http_page_without_password_has_no_signal() -> None:
    url = "http://news.example.org/a"
    assert analyze(url, report(url, title="Local news")).signals == []


def test_script_redirect_within_a_brand_is_normal() -> None:
    url = "https://www.youtube.com/watch"
    r = report(url, js_redirects=["https://accounts.google.com/ServiceLogin"])
    assert run("js_redirect_cross_domain", url, r) == []


# --- render scans: what a browser saw (report.render, with the static report beside it) -----

PAGE = "https://portal.example.org/login"


def rendered(url: str = PAGE, title: str | None = "Sign in", render: Render | None = None,
             **features: Any) -> Report:
    """A render report: the top-level features are the DOM's after scripts ran."""
    base = report(url, title, **features)
    return base.model_copy(update={"fetcher_version": "render-0.1.0",
                                   "render": render or Render()})


def run_render(name: str, r: Report, static: Report | None = None,
               url: str = PAGE) -> list[Signal]:
    ctx = Context(url=url, report=r, blocklist=None, catalogue=shipped_catalogue(),
                  static=static)
    return list(RULES[name].check(ctx))


def request(url: str, type_: str = "image", method: str = "GET", **kw: Any) -> RenderRequest:
    return RenderRequest(url=url, type=type_, method=method, **kw)


def test_render_rules_are_silent_without_a_render() -> None:
    static = report(PAGE, "Sign in", forms=[password_form(PAGE)])
    for name in ("script_built_form", "script_redirect_cross_domain", "kit_resources_cross_host",
                 "brand_assets_hotlinked", "refused_subrequest", "render_cloaking"):
        assert run_render(name, static, static) == [], name


def test_form_built_by_script_is_found_against_the_static_html() -> None:
    static = report(PAGE, "Sign in")  # the HTML alone: no form
    after = rendered(forms=[password_form("https://collect.example.net/p")])
    [signal] = run_render("script_built_form", after, static)
    assert "password" in signal.evidence and "collect.example.net" in signal.evidence
    # The same form already in the static HTML, or no static report to compare: nothing.
    assert run_render("script_built_form", after,
                      report(PAGE, "Sign in", forms=[password_form(PAGE)])) == []
    assert run_render("script_built_form", after, None) == []
    # A newsletter box (e-mail only) built by script is no credential form.
    assert run_render("script_built_form", rendered(forms=[Form(
        action=PAGE, has_email=True)]), static) == []


def test_script_built_login_on_a_collector_is_malicious_and_static_saw_nothing() -> None:
    collector = Form(action="http://collect.example.net/p", method="post", has_password=True,
                     has_email=True)
    static = report(PAGE, "Account", headings=["Verify your account"])
    after = rendered(title="Account", headings=["Verify your account"], forms=[collector])
    assert analyze(PAGE, static).verdict is Verdict.SAFE
    result = analyze(PAGE, after, static=static)
    assert result.verdict is Verdict.MALICIOUS
    assert {"script_built_form", "password_form_cross_domain"} <= {
        s.name for s in result.signals}


def test_single_page_app_login_on_its_own_site_stays_safe() -> None:
    """An app builds its own login form by script, posting to itself, with web fonts and a
    video embed from Google and analytics beacons: normal."""
    static = report(PAGE, "Portal", text="Loading…")
    reqs = [request("https://fonts.googleapis.com/css2?family=Inter", "stylesheet"),
            request("https://fonts.gstatic.com/s/inter.woff2", "font"),
            request("https://www.google-analytics.com/g/collect", "fetch", "POST"),
            request("https://api.portal.example.org/session", "fetch", "POST"),
            request("https://cdn.jsdelivr.net/npm/react.js", "script")]
    after = rendered(title="Portal - sign in", forms=[password_form(PAGE)],
                     render=Render(requests=reqs))
    result = analyze(PAGE, after, static=static)
    assert result.verdict is Verdict.SAFE, result.signals
    assert [s.name for s in result.signals] == ["script_built_form"]


def test_script_redirect_to_another_organisation_is_recorded() -> None:
    hops = [RenderHop(url=PAGE, location="https://landing.example.net/x", kind="script")]
    [signal] = run_render("script_redirect_cross_domain", rendered(
        "https://landing.example.net/x", render=Render(navigation=hops)))
    assert "landing.example.net" in signal.evidence
    # A header redirect (its own rules), or a script hop within the site: nothing.
    same = [RenderHop(url=PAGE, location="https://www.example.org/", kind="script"),
            RenderHop(url=PAGE, location="https://landing.example.net/", kind="http")]
    assert run_render("script_redirect_cross_domain", rendered(
        render=Render(navigation=same))) == []


def test_kit_resources_from_an_ip_or_posted_by_script_elsewhere() -> None:
    by_ip = rendered(render=Render(requests=[request("http://203.0.113.9/kit/app.js", "script")]))
    [signal] = run_render("kit_resources_cross_host", by_ip)
    assert "203.0.113.9" in signal.evidence
    posted = rendered(render=Render(requests=[
        request("https://drop.example.net/gate.php", "xhr", "POST"),
        request("https://drop.example.net/x.js", "script")]))
    [signal] = run_render("kit_resources_cross_host", posted)
    assert "POST to example.net" in signal.evidence
    # CDN code by name, GETs, ad/analytics beacons and the page's own API are normal.
    normal = rendered(render=Render(requests=[
        request("https://cdnjs.cloudflare.com/x.js", "script"),
        request("https://api.example.net/data.json", "fetch"),
        request("https://www.google-analytics.com/g/collect", "fetch", "POST"),
        request("https://api.example.org/login", "fetch", "POST")]))
    assert run_render("kit_resources_cross_host", normal) == []


def test_brand_assets_hot_linked_by_a_credential_page() -> None:
    reqs = [request("https://www.paypalobjects.com/images/logo.svg")]
    page = rendered(forms=[password_form(PAGE)], render=Render(requests=reqs))
    [signal] = run_render("brand_assets_hotlinked", page)
    assert "PayPal" in signal.evidence and "paypalobjects.com" in signal.evidence
    # No credential form (an article with the logo), or the brand's own site: nothing.
    assert run_render("brand_assets_hotlinked", rendered(render=Render(requests=reqs))) == []
    own = "https://www.paypal.com/signin"
    assert run_render("brand_assets_hotlinked", rendered(
        own, forms=[password_form(own)], render=Render(requests=reqs)), url=own) == []
    # Google's fonts on a login page are a font, not the brand's look.
    fonts = [request("https://fonts.gstatic.com/s/inter.woff2", "font")]
    assert run_render("brand_assets_hotlinked", rendered(
        forms=[password_form(PAGE)], render=Render(requests=fonts))) == []


def test_refused_sub_request_to_a_private_address_is_evidence() -> None:
    refused = [Refusal(url="http://192.168.1.1/pixel.png", method="GET", code="BLOCKED_TARGET",
                       reason="192.168.1.1 is private (192.168.0.0/16)")]
    result = analyze(PAGE, rendered(render=Render(refused=refused)))
    signal = only(result, "refused_subrequest")
    assert "192.168.1.1" in signal.evidence
    assert result.verdict is Verdict.SUSPICIOUS
    # A port we do not fetch is our policy; the submitted URL's own refusal is not a
    # sub-request; a DNS failure is not an address.
    others = [Refusal(url="http://example.net:8080/", code="BLOCKED_TARGET",
                      reason="port 8080 is not in the allowed ports"),
              Refusal(url=PAGE, code="BLOCKED_TARGET", reason="10.0.0.1 is private"),
              Refusal(url="http://nx.example.net/", code="DNS_FAILED", reason="no answer")]
    assert run_render("refused_subrequest", rendered(render=Render(refused=others))) == []


DECOY = ("Our bakery has served the neighbourhood since 1952 with sourdough, rye and seasonal "
         "pastries. Visit our shop on the corner of Main Street, open every morning from seven. "
         "We bake everything on site and deliver to restaurants across town every day.")


def test_cloaking_static_decoy_and_rendered_lure_differ() -> None:
    static = report(PAGE, "Corner Bakery - fresh bread", text=DECOY)
    lure = rendered(title="Microsoft 365 - verify", text="Sign in to continue to Outlook "
                    "Your mailbox is full enter your password to verify")
    [signal] = run_render("render_cloaking", lure, static)
    assert "Corner Bakery" in signal.evidence
    # The same page after scripts (title kept, text grown), or an app's tiny static shell,
    # or a browser that went elsewhere (the redirect rules speak then): nothing.
    grown = rendered(title="Corner Bakery - fresh bread", text=DECOY + " Order online now.")
    assert run_render("render_cloaking", grown, static) == []
    shell = report(PAGE, "App", text="Please enable JavaScript")
    assert run_render("render_cloaking", lure, shell) == []
    away = rendered("https://elsewhere.example.net/", title="Microsoft 365", text="Sign in now")
    assert run_render("render_cloaking", away, static) == []


def test_a_refused_port_is_policy_also_in_the_browsers_wording() -> None:
    """The browser image words a refusal `URL: reason`; a port refusal is still not a probe."""
    hops = [RedirectHop(url=PAGE, status=None, location="http://site-b.example/x", kind="meta")]
    r = report(PAGE).model_copy(update={"redirects": hops, "error": ReportError(
        code="BLOCKED_TARGET",
        message="http://site-b.example/x: port 8443 is not in the allowed ports")})
    assert run("redirect_to_blocked_target", PAGE, r) == []
    probe = r.model_copy(update={"error": ReportError(
        code="BLOCKED_TARGET", message="http://site-b.example/x: 10.0.0.5 is private")})
    assert [s.name for s in run("redirect_to_blocked_target", PAGE, probe)] == [
        "redirect_to_blocked_target"]
