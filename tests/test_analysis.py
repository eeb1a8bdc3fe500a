"""Unit tests for safeurl_worker.analysis: reports are built directly, no network."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from safeurl_worker import rules
from safeurl_worker.analysis import analyze
from safeurl_worker.blocklist import Blocklist
from safeurl_worker.models import (
    Analysis,
    Features,
    Form,
    Iframe,
    RedirectHop,
    Report,
    ReportError,
    ScriptStats,
    TlsInfo,
    Verdict,
)
from safeurl_worker.rules import ANALYZER_VERSION, RULES

ROOT = Path(__file__).resolve().parent.parent
URL = "https://shop.example.com/"


def report(url: str = URL, **kw: Any) -> Report:
    """A fetched, fully parsed page with some text; keyword arguments override any field
    (features given without an explicit `parse` count as fully parsed)."""
    fields: dict[str, Any] = {
        "fetcher_version": "test",
        "requested_url": url,
        "final_url": url,
        "http_status": 200,
        "content_type": "text/html; charset=utf-8",
        "body_size": 5000,
        "tls": TlsInfo(verified=True, version="TLSv1.3") if url.startswith("https") else None,
        "features": Features(parse="full", text="Welcome to the shop", links_count=12),
    }
    fields.update(kw)
    features = fields["features"]
    if "parse" not in features.model_fields_set:
        fields["features"] = features.model_copy(update={"parse": "full"})
    return Report(**fields)


def unfetched(url: str = URL, code: str = "DNS_FAILED") -> Report:
    return Report(fetcher_version="test", requested_url=url,
                  error=ReportError(code=code, message="lookup failed"))


def names(result: Analysis) -> set[str]:
    return {s.name for s in result.signals}


def weight(name: str) -> int:
    return RULES[name].weight


def blocklist_file(tmp_path: Path, text: str) -> Blocklist:
    path = tmp_path / "blocklist.txt"
    path.write_text(text)
    return Blocklist(path, check_interval_s=0)


# --- verdicts -------------------------------------------------------------------------------


def test_benign_page_is_safe() -> None:
    features = Features(
        forms=[Form(action="https://shop.example.com/search", method="get")],
        iframes=[Iframe(src="https://www.youtube.com/embed/x")],
        external_scripts=["https://cdn.example.com/app.js"],
        scripts=ScriptStats(inline_count=3, document_write_count=1),
        links_count=40,
    )
    result = analyze(URL, report(features=features, title="Shop"))
    assert result.verdict is Verdict.SAFE
    assert result.score == 0
    assert result.signals == []
    assert result.analyzer_version == ANALYZER_VERSION == "2.1.0"
    assert result.confidence == 1.0


def test_same_site_redirect_and_login_are_safe() -> None:
    hops = [RedirectHop(url="http://example.com/", status=301,
                        location="https://www.example.com/login")]
    forms = [Form(action="https://auth.example.com/session", method="post", has_password=True)]
    result = analyze("http://example.com/", report(
        "http://example.com/", final_url="https://www.example.com/login", redirects=hops,
        tls=TlsInfo(verified=True), features=Features(forms=forms)))
    assert result.verdict is Verdict.SAFE, result.signals


def test_login_form_posting_elsewhere_is_suspicious() -> None:
    forms = [Form(action="https://collector.evil.test/p.php", method="post", has_password=True)]
    result = analyze(URL, report(features=Features(forms=forms)))
    assert "password_form_cross_domain" in names(result)
    assert result.verdict in (Verdict.SUSPICIOUS, Verdict.MALICIOUS)
    assert weight("password_form_cross_domain") >= rules.DEFAULT_SUSPICIOUS_THRESHOLD


def test_password_form_to_mailto_is_cross_domain() -> None:
    forms = [Form(action="mailto:thief@evil.test", method="post", has_password=True)]
    assert "password_form_cross_domain" in names(analyze(URL, report(
        features=Features(forms=forms))))


def test_form_without_password_is_not_flagged() -> None:
    forms = [Form(action="http://other.test/subscribe", method="post")]
    result = analyze(URL, report(features=Features(forms=forms)))
    assert not names(result) & {"password_form_cross_domain", "password_form_insecure"}


def test_redirect_chain_across_domains() -> None:
    hops = [
        RedirectHop(url=URL, status=302, location="https://www.example.com/go"),
        RedirectHop(url="https://www.example.com/go", status=302,
                    location="https://landing.other.test/x"),
    ]
    result = analyze(URL, report(final_url="https://landing.other.test/x", redirects=hops))
    signal = next(s for s in result.signals if s.name == "cross_domain_redirect")
    assert "other.test" in signal.evidence
    assert "example.com" in signal.evidence


def test_redirect_between_ip_hosts_compares_the_ip() -> None:
    r = report("http://10.0.0.1/", final_url="http://10.0.0.2/", tls=None,
               redirects=[RedirectHop(url="http://10.0.0.1/", status=302,
                                      location="http://10.0.0.2/")])
    assert "cross_domain_redirect" in names(analyze("http://10.0.0.1/", r))
    same = report("http://10.0.0.1/", final_url="http://10.0.0.1/b", tls=None)
    assert "cross_domain_redirect" not in names(analyze("http://10.0.0.1/", same))


def test_http_password_form() -> None:
    url = "http://bank.example.com/login"
    forms = [Form(action="http://bank.example.com/login", method="post", has_password=True)]
    result = analyze(url, report(url, features=Features(forms=forms)))
    assert "password_form_insecure" in names(result)
    assert result.verdict is Verdict.SUSPICIOUS


def test_https_page_posting_password_over_http() -> None:
    forms = [Form(action="http://shop.example.com/login", method="post", has_password=True)]
    result = analyze(URL, report(features=Features(forms=forms)))
    assert "password_form_insecure" in names(result)


def test_exe_download() -> None:
    url = "https://files.example.com/setup.exe"
    result = analyze(url, report(url, content_type="application/octet-stream"))
    assert "executable_download" in names(result)
    typed = analyze(URL, report(content_type="application/x-msdownload"))
    assert "executable_download" in names(typed)


def test_download_by_content_disposition() -> None:
    r = report("https://example.com/get?id=1", content_type="application/octet-stream",
               headers={"Content-Disposition": 'attachment; filename="Invoice.PDF.scr"'})
    result = analyze("https://example.com/get?id=1", r)
    signal = next(s for s in result.signals if s.name == "executable_download")
    assert "invoice.pdf.scr" in signal.evidence


def test_archive_weighs_less_than_executable() -> None:
    result = analyze(URL, report(content_type="application/zip"))
    assert names(result) == {"archive_download"}
    assert weight("archive_download") < weight("executable_download")


def test_html_page_with_exe_looking_path_is_not_a_download() -> None:
    url = "https://example.com/docs/setup.exe"  # a page *about* a file, served as HTML
    assert "executable_download" not in names(analyze(url, report(url)))


def test_meta_refresh_to_another_domain() -> None:
    result = analyze(URL, report(features=Features(meta_refresh="https://evil.test/x")))
    assert "meta_refresh_cross_domain" in names(result)
    same = analyze(URL, report(features=Features(meta_refresh="https://www.example.com/")))
    assert "meta_refresh_cross_domain" not in names(same)


def test_js_redirect_to_another_domain() -> None:
    result = analyze(URL, report(features=Features(js_redirects=["https://evil.test/"])))
    assert "js_redirect_cross_domain" in names(result)


def test_obfuscated_inline_script_scales_and_caps() -> None:
    light = ScriptStats(eval_count=1, atob_count=1)
    heavy = ScriptStats(eval_count=9, atob_count=5, unescape_count=3, fromcharcode_count=40,
                        long_base64_runs=4)
    w_light = next(s.weight for s in analyze(URL, report(features=Features(scripts=light)))
                   .signals if s.name == "obfuscated_script")
    w_heavy = next(s.weight for s in analyze(URL, report(features=Features(scripts=heavy)))
                   .signals if s.name == "obfuscated_script")
    assert 0 < w_light < w_heavy == weight("obfuscated_script")


def test_single_document_write_is_not_obfuscation() -> None:
    stats = ScriptStats(document_write_count=1)
    assert "obfuscated_script" not in names(analyze(URL, report(features=Features(scripts=stats))))


def test_hidden_iframe() -> None:
    iframes = [Iframe(src="https://ads.test/a"), Iframe(src="https://exploit.test/k", hidden=True)]
    result = analyze(URL, report(features=Features(iframes=iframes)))
    signal = next(s for s in result.signals if s.name == "hidden_iframe")
    assert "exploit.test" in signal.evidence


def test_tls_not_verified() -> None:
    r = report(tls=TlsInfo(verified=False, error="self-signed certificate"))
    signal = next(s for s in analyze(URL, r).signals if s.name == "tls_error")
    assert "self-signed" in signal.evidence


def test_tls_error_code_on_unfetched_target_is_unknown() -> None:
    result = analyze(URL, unfetched(code="TLS_ERROR"))
    assert "tls_error" in names(result)
    assert result.verdict is Verdict.UNKNOWN


@pytest.mark.parametrize("url", ["http://192.0.2.7/login", "http://[2001:db8::1]/",
                                 "http://0xc0.0.2.7/", "http://3221226055/"])
def test_ip_literal(url: str) -> None:
    result = analyze(url, report(url))
    signal = next(s for s in result.signals if s.name == "ip_literal_host")
    assert "192.0.2.7" in signal.evidence or "2001:db8::1" in signal.evidence


def test_punycode_host() -> None:
    url = "https://xn--bcher-kva.example/"
    signal = next(s for s in analyze(url, report(url)).signals if s.name == "punycode_host")
    assert "bücher" in signal.evidence
    assert "mixed_script_host" not in names(analyze(url, report(url)))


@pytest.mark.parametrize("url", ["https://p\u0430ypal.com/", "https://xn--pypal-4ve.com/"])
def test_mixed_script_host(url: str) -> None:
    result = analyze(url, report(url))
    assert {"mixed_script_host", "punycode_host"} <= names(result)
    assert result.verdict is not Verdict.SAFE


@pytest.mark.parametrize("url", ["https://пример.рф/", "https://ソニー銀行.jp/",
                                 "https://sony銀行.jp/", "https://bücher.de/"])
def test_single_script_idn_is_not_mixed(url: str) -> None:
    assert "mixed_script_host" not in names(analyze(url, report(url)))


@pytest.mark.parametrize("url", ["http://paypal.com:secure@evil.test/", "http://paypal.com@evil.test/"])
def test_userinfo(url: str) -> None:
    signal = next(s for s in analyze(url, report(url)).signals if s.name == "userinfo_in_url")
    assert "evil.test" in signal.evidence


def test_many_subdomains() -> None:
    url = "https://login.paypal.com.secure.verify.account.evil.co.uk/"
    signal = next(s for s in analyze(url, report(url)).signals
                  if s.name == "excessive_subdomains")
    assert "evil.co.uk" in signal.evidence
    four = "https://a.b.c.d.example.co.uk/"
    assert "excessive_subdomains" not in names(analyze(four, report(four)))


def test_long_url_and_long_host() -> None:
    url = "https://" + "secure-account-verification-" * 3 + "example.com/" + "a" * 150
    assert {"long_url", "long_host"} <= names(analyze(url, report(url)))


# --- blocklist ------------------------------------------------------------------------------

BLOCKLIST = """\
# operator blocklist
evil.test            # whole domain
*.wild.test
https://Good.Example.org/phish?id=1#frag

not a valid entry
"""


def test_blocklist_by_domain_and_subdomain(tmp_path: Path) -> None:
    bl = blocklist_file(tmp_path, BLOCKLIST)
    assert bl.match("http://evil.test/") == "evil.test"
    assert bl.match("https://a.b.EVIL.test./x") == "evil.test"
    assert bl.match("https://x.wild.test/") == "*.wild.test"
    assert bl.match("https://notevil.test/") is None
    assert bl.match("https://evil.test.example.com/") is None
    result = analyze("https://cdn.evil.test/a", report("https://cdn.evil.test/a"), blocklist=bl)
    assert result.verdict is Verdict.MALICIOUS
    assert names(result) == {"blocklist_hit"}


def test_blocklist_by_url(tmp_path: Path) -> None:
    bl = blocklist_file(tmp_path, BLOCKLIST)
    entry = "https://Good.Example.org/phish?id=1#frag"
    assert bl.match("HTTPS://good.example.org:443/phish?id=1") == entry
    assert bl.match("https://good.example.org/phish?id=2") is None
    assert bl.match("https://good.example.org/") is None
    url = "https://good.example.org/phish?id=1"
    assert analyze(url, report(url), blocklist=bl).verdict is Verdict.MALICIOUS


def test_blocklist_hit_on_redirect_hop(tmp_path: Path) -> None:
    bl = blocklist_file(tmp_path, BLOCKLIST)
    hops = [RedirectHop(url=URL, status=302, location="https://track.evil.test/r"),
            RedirectHop(url="https://track.evil.test/r", status=302,
                        location="https://www.example.com/")]
    result = analyze(URL, report(final_url="https://www.example.com/", redirects=hops),
                     blocklist=bl)
    assert "blocklist_hit" in names(result)
    assert result.verdict is Verdict.MALICIOUS
    assert result.score == 100


# --- unfetched targets and scoring ----------------------------------------------------------


def test_unfetched_target_is_unknown() -> None:
    result = analyze(URL, unfetched())
    assert result.verdict is Verdict.UNKNOWN
    assert result.signals == []


def test_unfetched_target_with_blocklist_hit_is_malicious(tmp_path: Path) -> None:
    bl = blocklist_file(tmp_path, BLOCKLIST)
    result = analyze("https://evil.test/", unfetched("https://evil.test/"), blocklist=bl)
    assert result.verdict is Verdict.MALICIOUS


def test_unfetched_target_with_url_signals_above_threshold() -> None:
    url = "http://paypal.com@192.0.2.7/"  # userinfo + IP literal = 45
    result = analyze(url, unfetched(url))
    assert result.verdict is Verdict.SUSPICIOUS
    weak = "http://192.0.2.7/"  # IP literal alone = 20
    assert analyze(weak, unfetched(weak)).verdict is Verdict.UNKNOWN


def test_error_with_http_status_is_analyzed() -> None:
    # e.g. the body was cut off: the page was fetched, so it gets a real verdict
    r = report(error=ReportError(code="BODY_TOO_LARGE"))
    assert analyze(URL, r).verdict is Verdict.SAFE


def test_thresholds_configurable() -> None:
    forms = [Form(action="https://collector.evil.test/p", method="post", has_password=True)]
    r = report(features=Features(forms=forms))
    assert analyze(URL, r).verdict is Verdict.SUSPICIOUS
    assert analyze(URL, r, suspicious_threshold=10, malicious_threshold=20).verdict is \
        Verdict.MALICIOUS
    assert analyze(URL, r, suspicious_threshold=90, malicious_threshold=95).verdict is \
        Verdict.SAFE
    with pytest.raises(ValueError):
        analyze(URL, r, suspicious_threshold=70, malicious_threshold=30)


def test_score_capped_at_100() -> None:
    url = "http://paypal.com@192.0.2.7/" + "x" * 300
    features = Features(
        forms=[Form(action="http://collector.evil.test/p", method="post", has_password=True)],
        iframes=[Iframe(src="https://exploit.test/", hidden=True)],
        meta_refresh="https://evil.test/",
        js_redirects=["https://evil.test/"],
        scripts=ScriptStats(eval_count=5, fromcharcode_count=5, long_base64_runs=3),
    )
    result = analyze(url, report(url, content_type="application/x-msdownload",
                                 features=features))
    assert sum(s.weight for s in result.signals) > 100
    assert result.score == 100
    assert result.verdict is Verdict.MALICIOUS


def test_evidence_is_short_and_single_line() -> None:
    target = "https://evil.test/\n\r" + "a" * 2000
    result = analyze(URL, report(features=Features(meta_refresh=target)))
    for s in result.signals:
        assert len(s.evidence) <= 300
        assert "\n" not in s.evidence and "\r" not in s.evidence


def test_every_signal_name_is_a_rule() -> None:
    url = "http://paypal.com@192.0.2.7/"
    assert names(analyze(url, report(url))) <= set(RULES)
    assert all(callable(r.check) and r.description for r in RULES.values())


def test_a_rule_name_registers_once() -> None:
    with pytest.raises(ValueError, match="twice"):
        rules.rule("tls_error", 1, "again")(rules.tls_error)
    assert RULES["tls_error"].check is rules.tls_error


def test_rule_weights_meet_the_policy() -> None:
    assert weight("blocklist_hit") >= rules.DEFAULT_MALICIOUS_THRESHOLD
    assert weight("password_form_cross_domain") >= rules.DEFAULT_SUSPICIOUS_THRESHOLD
    url_level = {n for n, r in RULES.items() if r.url_level}
    assert url_level == {"blocklist_hit", "ip_literal_host", "punycode_host",
                         "mixed_script_host", "userinfo_in_url", "excessive_subdomains",
                         "long_url", "long_host", "lookalike_domain",
                         "redirect_to_blocked_target"}
    assert weight("redirect_to_blocked_target") >= rules.DEFAULT_MALICIOUS_THRESHOLD
    assert weight("brand_impersonation") >= rules.DEFAULT_MALICIOUS_THRESHOLD


def test_hostile_report_urls_do_not_crash() -> None:
    odd = ["http://[::1", "javascript:alert(1)", "", "http://a..b/", "http://x:99999/"]
    hops = [RedirectHop(url=u or "x", status=302, location=u) for u in odd]
    features = Features(
        forms=[Form(action=u, has_password=True) for u in odd],
        iframes=[Iframe(src=u, hidden=True) for u in odd],
        meta_refresh="http://[::1",
        js_redirects=odd,
    )
    r = report(final_url="http://[::1", redirects=hops, features=features,
               headers={"content-disposition": "attachment; filename*=UTF-8''%E2%82%AC.exe"},
               content_type="application/octet-stream")
    result = analyze(URL, r)
    assert result.verdict in set(Verdict)
    assert analyze("not a url", r).verdict in set(Verdict)


# --- docs -----------------------------------------------------------------------------------


def test_docs_list_every_rule_with_its_weight() -> None:
    text = (ROOT / "docs" / "analysis.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\|\s*`(\w+)`\s*\|\s*(\d+)", text, flags=re.MULTILINE))
    assert {name: int(w) for name, w in rows.items()} == {n: r.weight for n, r in RULES.items()}
    assert ANALYZER_VERSION in text


# --- honest verdicts: what was seen, and confidence ------------------------------------------


def test_unparsable_html_page_is_unknown_not_safe() -> None:
    result = analyze(URL, report(features=Features(parse="none")))
    assert result.verdict is Verdict.UNKNOWN
    assert result.confidence < 0.5


def test_page_where_nothing_was_seen_is_unknown() -> None:
    empty = report(features=Features(parse="full"), body_size=0)
    result = analyze(URL, empty)
    assert (result.verdict, result.signals) == (Verdict.UNKNOWN, [])
    assert result.confidence <= 0.2


def test_partial_parse_with_nothing_seen_is_unknown() -> None:
    partial = report(features=Features(parse="partial", parse_problem="element limit"))
    assert analyze(URL, partial).verdict is Verdict.UNKNOWN
    seen = report(features=Features(parse="partial", text="Hello", headings=["News"],
                                    links_count=40))
    result = analyze(URL, seen)
    assert result.verdict is Verdict.SAFE
    assert 0.5 <= result.confidence < 1.0


def test_non_html_response_is_judged_on_its_type_with_less_confidence() -> None:
    image = report(content_type="image/png", features=Features(parse="none"))
    result = analyze(URL, image)
    assert result.verdict is Verdict.SAFE
    assert 0.5 <= result.confidence < 1.0


def test_evidence_on_an_unparsable_page_still_counts() -> None:
    url = "https://paypal.com-resolution-center.info/"
    forms = [Form(action="https://collector.evil.test/p", has_password=True)]
    result = analyze(url, report(url, features=Features(parse="none", forms=forms)))
    assert result.verdict in (Verdict.SUSPICIOUS, Verdict.MALICIOUS)
    assert result.confidence >= 0.5


def test_unfetched_target_has_zero_confidence() -> None:
    assert analyze(URL, unfetched()).confidence == 0.0


def test_redirect_to_internal_address_is_malicious() -> None:
    """The fetcher refuses the hop (BLOCKED_TARGET) after following a public redirect."""
    hops = [RedirectHop(url=URL, status=302,
                        location="http://169.254.169.254/latest/meta-data/")]
    refused = Report(fetcher_version="test", requested_url=URL, final_url=URL, http_status=302,
                     redirects=hops, error=ReportError(code="BLOCKED_TARGET",
                                                       message="address not allowed"))
    result = analyze(URL, refused)
    assert result.verdict is Verdict.MALICIOUS
    signal = next(s for s in result.signals if s.name == "redirect_to_blocked_target")
    assert "169.254.169.254" in signal.evidence
    # the same hop reported without a status (the fetcher kept no response) counts too
    bare = refused.model_copy(update={"http_status": None, "final_url": None})
    assert analyze(URL, bare).verdict is Verdict.MALICIOUS


def test_redirect_to_a_port_we_do_not_fetch_is_not_evidence() -> None:
    """cPanel webmail redirects to :2096: refused by our port policy, not an SSRF probe."""
    hops = [RedirectHop(url=URL, status=301, location="https://shop.example.com:2096/")]
    refused = Report(fetcher_version="test", requested_url=URL, final_url=URL, http_status=301,
                     redirects=hops, error=ReportError(
                         code="BLOCKED_TARGET", message="port 2096 is not in the allowed ports"))
    result = analyze(URL, refused)
    assert "redirect_to_blocked_target" not in names(result)
    assert result.verdict is not Verdict.MALICIOUS


def test_refused_target_without_redirect_is_not_evidence() -> None:
    """A URL that names an internal address itself is refused, not judged (pipeline FAILs it)."""
    direct = unfetched("http://10.0.0.1/", code="BLOCKED_TARGET")
    result = analyze("http://10.0.0.1/", direct)
    assert result.verdict is Verdict.UNKNOWN
    assert "redirect_to_blocked_target" not in names(result)


def test_blocklist_is_checked_when_the_fetch_was_refused(tmp_path: Path) -> None:
    bl = blocklist_file(tmp_path, "sinkholed.test\n")
    refused = unfetched("https://sinkholed.test/", code="BLOCKED_TARGET")
    result = analyze("https://sinkholed.test/", refused, blocklist=bl)
    assert result.verdict is Verdict.MALICIOUS
    assert names(result) == {"blocklist_hit"}


def test_body_cut_short_with_little_seen_is_unknown() -> None:
    """A drip-fed page ended by the read deadline: a 200, a few bytes of text, nothing else."""
    drip = report(error=ReportError(code="READ_TIMEOUT", message="deadline"),
                  features=Features(parse="full", text="xxxxx"))
    result = analyze(URL, drip)
    assert result.verdict is Verdict.UNKNOWN and result.confidence < 0.5
