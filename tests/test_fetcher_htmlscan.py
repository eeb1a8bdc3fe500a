"""The fetcher's page reading: each evasion a browser is immune to, and each bound, as a unit.

htmlscan (the Lexbor tree and the features), content (Content-Encoding, MIME sniffing,
encodings) and reportfit (the stdout cap) are pure: no network, no container.
"""

from __future__ import annotations

import gzip
import json
import time
import zlib
from typing import Any

import pytest

from safeurl_worker.fetcher import content, htmlscan, reportfit
from safeurl_worker.models import Features, Report

BASE = "https://kit.example/login/"


def scan(html: str, budget_s: float = htmlscan.PARSE_BUDGET_S) -> htmlscan.PageFeatures:
    page = htmlscan.scan_html(html, BASE, budget_s)
    Features.model_validate(page.features())  # always within the worker's model
    return page


# --- what a browser sees ----------------------------------------------------------------------

@pytest.mark.parametrize("trick", [
    "<!-- --!>",  # a comment closed the HTML5 way; html.parser kept reading a comment
    "<!-->",  # an empty comment
    "<![x[>",  # a bogus CDATA section ends at the first '>'
    "<!--->",
    "<? x >",  # a bogus comment
])
def test_comment_tricks_hide_nothing(trick: str) -> None:
    page = scan(f"<title>T</title>{trick}<h1>PayPal</h1><form><input type=password></form>")
    assert page.headings == ["PayPal"]
    assert page.forms and page.forms[0]["has_password"]
    assert page.parse == "full"


def test_comment_hides_what_it_hides_in_a_browser() -> None:
    page = scan("<!-- <form><input type=password></form> --><h1>x</h1>")
    assert page.forms == [] and page.headings == ["x"]


def test_features_of_a_brand_kit_page() -> None:
    page = scan("""<!doctype html><html><head><title>  Log in to your
      PayPal   account</title><base href="/assets/">
    <meta property="og:site_name" content="PayPal"><meta property="og:title" content="Log in">
    <meta property="og:url" content="https://www.paypal.com/signin">
    <meta property="og:image" content="logo-og.png"><meta name="application-name" content="PP">
    <meta name="description" content=" Pay  online ">
    <link rel="canonical" href="https://www.paypal.com/signin">
    <link rel="shortcut icon" href="favicon.ico"><link rel="apple-touch-icon" href="/t.png">
    <link rel="stylesheet" href="https://www.paypalobjects.com/web/res/a.css">
    </head><body><h1>Pay<b>Pal</b></h1><h2>Welcome&nbsp;back</h2><h4>not a heading we keep</h4>
    <img src="pp-logo.svg" alt=" PayPal  logo"><img srcset="x1.png 1x, x2.png 2x">
    <div hidden>hidden words</div><span style="display: none">more hidden</span>
    <p>Visible <i>words</i></p><button type=button>Next</button>
    <input type=submit value="Log In"><a role=button href=#>Sign Up</a></body></html>""")
    assert page.title == "Log in to your PayPal account"
    assert page.headings == ["PayPal", "Welcome back"]
    assert page.meta == {
        "og_site_name": "PayPal", "og_title": "Log in", "og_url": "https://www.paypal.com/signin",
        "og_image": "https://kit.example/assets/logo-og.png", "application_name": "PP",
        "description": "Pay online", "canonical": "https://www.paypal.com/signin"}
    assert page.icons == ["https://kit.example/assets/favicon.ico", "https://kit.example/t.png"]
    assert page.stylesheets == ["https://www.paypalobjects.com/web/res/a.css"]
    assert page.images == [{"src": "https://kit.example/assets/pp-logo.svg", "alt": "PayPal logo"},
                           {"src": "https://kit.example/assets/x1.png", "alt": ""}]
    assert page.buttons == ["Next", "Log In", "Sign Up"]
    assert "PayPal Welcome back" in page.text and "Visible words" in page.text
    assert "hidden" not in page.text
    assert page.parse == "full" and page.parse_problem is None


def test_form_attribute_makes_an_outside_input_part_of_the_form() -> None:
    page = scan("""<form id=login action="/post" method=post><input name=user></form>
    <form id=other></form>
    <label for=pw>Password</label><input id=pw type=password form=login>
    <input type=password form=nope>""")
    login, other = page.forms
    assert login["has_password"] and login["has_email"]
    assert not other["has_password"]
    assert login["action"] == "https://kit.example/post" and login["method"] == "post"
    assert "Password" in login["text"]


def test_input_inside_a_form_but_owned_by_another() -> None:
    page = scan("<form id=a action=/a><input type=password form=b></form>"
                "<form id=b action=/b></form>")
    assert {f["action"].rsplit("/", 1)[1]: f["has_password"] for f in page.forms} == {
        "a": False, "b": True}


def test_decoy_forms_and_hidden_inputs_cannot_push_a_login_past_the_caps() -> None:
    decoys = "<form action=/d></form>" * 60
    padding = "<input type=hidden name=h value=x>" * 300
    page = scan(decoys + f"<form action=/login>{padding}<input type=password></form>")
    assert page.forms[0]["has_password"] and page.forms[0]["action"].endswith("/login")
    assert len(page.forms) == 50 and page.dropped["features.forms"] == 11


def test_table_form_owns_the_inputs_the_parser_gave_it() -> None:
    # The parser puts the form in the table, empty; its inputs are submitted with it anyway.
    page = scan("<table><form action=/t><tr><td><input type=password></td></tr></table>")
    assert page.forms[0]["has_password"]


@pytest.mark.parametrize("control,what", [
    ('<input type=email>', "has_email"),
    ('<input name=login_id>', "has_email"),
    ('<input autocomplete=username>', "has_email"),
    ('<label>Email or phone <input name=x1></label>', "has_email"),
    ('<input placeholder="E-mail address">', "has_email"),
    ('<input autocomplete=cc-number>', "has_card"),
    ('<input name=cardnumber>', "has_card"),
    ('<label for=c>CVV</label><input id=c>', "has_card"),
    ('<input placeholder="MM / YY">', "has_card"),
    ('<input autocomplete=one-time-code>', "has_otp"),
    ('<input name=otp>', "has_otp"),
    ('<input aria-label="Verification code">', "has_otp"),
    ('<input type=password>', "has_password"),
    ('<input autocomplete=current-password name=x>', "has_password"),
    ('<input type="Contrase\u00f1a" name=pw placeholder=Password>', "has_password"),  # a kit's
    ('<label>Passwort <input name=x2></label>', "has_password"),
    ('<input placeholder="Apple ID" name=apple>', "has_email"),
])
def test_what_a_form_asks_for(control: str, what: str) -> None:
    form = scan(f"<form>{control}<button>Go</button></form>").forms[0]
    flags = {k for k in ("has_email", "has_card", "has_otp", "has_password") if form[k]}
    assert flags == {what}, form


@pytest.mark.parametrize("control", ['<input name=zip placeholder="ZIP code">',
                                     '<input name=promo placeholder="Promo code">',
                                     '<input type=search name=q>', '<textarea name=msg>'])
def test_ordinary_fields_ask_for_nothing_sensitive(control: str) -> None:
    form = scan(f"<form>{control}</form>").forms[0]
    assert not any(form[k] for k in ("has_email", "has_card", "has_otp", "has_password"))


def test_hidden_and_button_controls_ask_for_nothing() -> None:
    form = scan("<form><input type=hidden name=email><input type=submit name=card value=Go>"
                "</form>").forms[0]
    assert not (form["has_email"] or form["has_card"] or form["has_otp"])
    assert form["text"] == "Go"


def test_base_href_and_empty_action() -> None:
    page = scan('<a href=x>1</a><base href="https://cdn.example/b/"><form></form>'
                '<form action=" go "></form><script src=s.js></script>')
    assert [f["action"] for f in page.forms] == [BASE, "https://cdn.example/b/go"]
    assert page.external_scripts == ["https://cdn.example/b/s.js"]
    assert page.links_count == 1


def test_noscript_is_read_as_a_scripting_browser_reads_it() -> None:
    page = scan("<head><noscript><img src=p.gif></noscript><link rel=icon href=/i.ico></head>"
                "<body><noscript><h1>enable js</h1></noscript><h1>shown</h1>")
    assert page.icons == ["https://kit.example/i.ico"] and page.headings == ["shown"]


# --- refresh ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    ("0; url=/next", (0.0, "/next")),
    ("5;URL='/q'", (5.0, "/q")),
    ("3, url = \"/a b\" trailing", (3.0, "/a b")),
    ("1.5 ; /direct", (1.0, "/direct")),
    (".5;url=/x", (0.0, "/x")),
    ("7", (7.0, None)),
    ("0; urlx", (0.0, "urlx")),  # "url" without '=' is the URL itself
    ("url=/nodelay", None),  # no delay: a browser does not refresh at all
    ("abc", None),
    ("5x; url=/y", None),
])
def test_refresh_parsing_follows_the_standard(value: str,
                                              expected: tuple[float, str | None] | None) -> None:
    assert htmlscan.parse_refresh(value) == expected


def test_meta_refresh_is_resolved_and_the_first_valid_one_wins() -> None:
    page = scan('<meta http-equiv=refresh content="bogus"><meta http-equiv="REFRESH" '
                'content="2; url=../x"><meta http-equiv=refresh content="0; url=/z">')
    assert (page.meta_refresh, page.meta_refresh_delay) == ("https://kit.example/x", 2.0)


# --- encodings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("body,ctype,text,encoding", [
    (b'<meta charset="utf-16"><p>\xc3\xa9', None, "é", "utf-8"),  # UTF-16 in ASCII: UTF-8
    (b'<meta charset="idna"><p>\xe9.', None, "é.", "windows-1252"),  # not a WHATWG label
    (b'<meta charset="x-made-up"><p>\xc3\xa9', None, "é", "utf-8"),
    (b"<p>\xe9.", "text/html; charset=idna", "é.", "windows-1252"),
    (b"<p>\xe9.", "text/html; charset=base64", "é.", "windows-1252"),
    (b"<p>\xe9", 'text/html; charset="latin1"', "é", "windows-1252"),
    (b'<meta http-equiv="Content-Type" content="text/html; charset=koi8-r"><p>\xc1', None,
     "\u0430", "koi8-r"),
    (b'<meta content="text/html; charset=koi8-r"><p>\xc3\xa9', None, "é", "utf-8"),  # no pragma
    (b'<!-- <meta charset=koi8-r> --><p>\xc3\xa9', None, "é", "utf-8"),  # a comment
    (b'<meta charset=x-user-defined><p>\xe9.', None, "é.", "windows-1252"),
    (b"\xef\xbb\xbf<meta charset=koi8-r><p>\xc3\xa9", "text/html; charset=koi8-r", "é", "utf-8"),
    (b"\xff\xfe<\x00p\x00>\x00\xe9\x00", None, "é", "utf-16le"),  # a real UTF-16 page has a BOM
    (b"<p>\xc3\xa9", "text/html; charset=windows-1252", "Ã©", "windows-1252"),
])
def test_encoding_is_chosen_as_browsers_do(body: bytes, ctype: str | None, text: str,
                                           encoding: str) -> None:
    decoded, used = content.decode_html(body, ctype)
    assert used == encoding
    assert decoded.endswith(text)


def test_prescan_stops_at_1024_bytes() -> None:
    body = b"<p>" + b"x" * 1100 + b"<meta charset=koi8-r>\xc3\xa9"
    assert content.decode_html(body, None)[1] == "utf-8"


# --- MIME sniffing ------------------------------------------------------------------------------

@pytest.mark.parametrize("ctype,body,html", [
    (None, b"<div>hi</div>", True),
    (None, b" \n\t<DIV>hi", True),
    (None, b"<!DOCTYPE html><p>", True),
    (None, b"<!-- c --><p>", True),
    (None, b"<p>x", True),
    (None, b"<b>x", True),
    (None, b"<br>", True),
    (None, b"<divx>", False),  # the signature must end the tag name
    (None, b"%PDF-1.7", False),
    (None, b"hello <div>", False),
    ("unknown/unknown", b"<div>", True),
    ("application/unknown", b"<html>", True),
    ("*/*", b"<table>", True),
    ("garbage", b"<div>", True),  # not a valid MIME type: as if missing
    ("text/plain", b"<div>", False),
    ("application/json", b"<div>", False),
    ("text/html; charset=utf-8", b"{}", True),
    ("application/xhtml+xml", b"<html/>", True),
])
def test_mime_sniffing(ctype: str | None, body: bytes, html: bool) -> None:
    assert content.is_html(ctype, body) is html


# --- Content-Encoding ---------------------------------------------------------------------------

def test_gzip_members_and_deflate_forms_decode() -> None:
    two = gzip.compress(b"<p>one") + gzip.compress(b"</p><p>two")
    assert content.decode_content(two, "gzip", 1 << 20).body == b"<p>one</p><p>two"
    assert content.decode_content(zlib.compress(b"z"), "deflate", 100).body == b"z"
    raw = zlib.compressobj(wbits=-15)
    body = raw.compress(b"raw") + raw.flush()
    assert content.decode_content(body, "deflate", 100).body == b"raw"
    assert content.decode_content(b"plain", "identity", 100).body == b"plain"


def test_gzip_bomb_stops_at_the_cap() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))
    start = time.monotonic()
    out = content.decode_content(bomb, "gzip", 1 << 20)
    assert len(out.body) == 1 << 20 and out.partial
    assert out.problem is not None and "more than 1048576 bytes" in out.problem
    assert time.monotonic() - start < 5


def test_cut_and_corrupt_bodies_decode_as_far_as_they_go() -> None:
    whole = gzip.compress(b"<title>t</title>" * 1000)
    cut = content.decode_content(whole[: len(whole) // 2], "gzip", 1 << 20)
    assert cut.body.startswith(b"<title>t</title>") and cut.partial
    bad = content.decode_content(b"\x1f\x8b\x08garbage", "gzip", 100)
    assert bad.partial and bad.problem is not None and "corrupt" in bad.problem


def test_unknown_coding_is_not_decoded() -> None:
    out = content.decode_content(b"xx", "br", 100)
    assert not out.decoded and out.problem == "Content-Encoding 'br' is not supported"


# --- parse bounds -------------------------------------------------------------------------------

def test_unclosed_anchor_flood_is_fast_and_full() -> None:
    # 60 KB of "<a " made html.parser superlinear (past the fetch deadline).
    start = time.monotonic()
    page = scan("<title>Bank</title><form><input type=password></form>" + "<a " * 20_000)
    assert time.monotonic() - start < 2
    assert page.parse == "full" and page.title == "Bank" and page.forms


@pytest.mark.parametrize("tail", [
    "<div>" * 400_000,  # Lexbor is quadratic in nesting depth
    "<ul><li>x" * 200_000,
    "<i " + " ".join(f"a{i}=x" for i in range(200_000)) + ">",  # and in attributes per tag
])
def test_superlinear_markup_ends_partial_within_the_budget(tail: str) -> None:
    head = "<title>PayPal</title><form action=/p><input type=password></form><h1>Log in</h1>"
    start = time.monotonic()
    page = scan(head + tail, budget_s=1.5)
    assert time.monotonic() - start < 1.5 * 1.3 + 0.5
    assert page.parse == "partial"
    assert page.parse_problem is not None and "time budget" in page.parse_problem
    # The features of what was parsed are there: never an empty report.
    assert page.title == "PayPal" and page.forms[0]["has_password"]
    assert page.headings == ["Log in"]


def test_element_cap_gives_partial_with_counted_drops() -> None:
    page = scan("<title>t</title>" + "<img src=a.png alt=b>" * (htmlscan.MAX_TAGS + 10))
    assert page.parse == "partial"
    assert f"more than {htmlscan.MAX_TAGS} tags" in (page.parse_problem or "")
    assert len(page.images) == htmlscan.MAX_IMAGES
    # <title> and </title> are two of the tags; the cut falls on the last tag's '<'
    assert page.dropped["features.images"] == htmlscan.MAX_TAGS - 3 - htmlscan.MAX_IMAGES


def test_size_cap_gives_partial() -> None:
    page = scan("<title>t</title><p>" + "x" * (htmlscan.MAX_PARSE_CHARS + 1))
    assert page.parse == "partial" and "characters" in (page.parse_problem or "")


def test_lists_and_strings_are_bounded() -> None:
    long = "W" * 5000
    html = "".join(f"<h1>{long}</h1><button>{long}</button><form action=/{i}>{long}</form>"
                   f"<link rel=icon href=/{i}.ico>" for i in range(60))
    page = scan(f"<title>{long}</title>" + html)
    f = Features.model_validate(page.features())
    assert len(f.headings) == 20 and len(f.buttons) == 20 and len(f.forms) == 50
    assert len(f.icons) == 10 and all(len(h) == 256 for h in f.headings)
    assert page.title is not None and len(page.title) == 1024
    assert page.dropped == {"features.headings": 40, "features.buttons": 40,
                            "features.forms": 10, "features.icons": 50}


# --- the stdout cap -----------------------------------------------------------------------------

def _report(**features: Any) -> dict[str, Any]:
    return {"schema_version": 1, "fetcher_version": "1", "requested_url": "http://a.test/",
            "redirects": [], "headers": {}, "features": {"parse": "full", **features},
            "error": None, "truncated": {}}


def test_cut_to_bytes_counts_json_escapes_and_utf8() -> None:
    text = "\u4e2d" * 10 + "\x01" * 10
    cut = reportfit.cut_to_bytes(text, 2 + 30 + 12)
    assert cut == "\u4e2d" * 10 + "\x01" * 2
    assert reportfit.encoded_size(cut) <= 44


@pytest.mark.parametrize("cap", [4096, 65536, 1 << 20])
def test_fit_bounds_any_report_and_counts_what_it_left_out(cap: int) -> None:
    url = "http://a.test/" + "%E4%B8%AD" * 900
    wide = "\U0001f600\u4e2d\x01" * 85  # 4-byte, 3-byte and escaped characters
    report = _report(
        forms=[{"action": url, "method": "post", "has_password": True, "text": wide}] * 50,
        images=[{"src": url, "alt": wide}] * 50, iframes=[{"src": url, "hidden": False}] * 50,
        external_scripts=[url] * 50, stylesheets=[url] * 50, icons=[url] * 10,
        js_redirects=[url] * 20, headings=[wide] * 20, buttons=[wide] * 20, text=wide * 16,
        meta={"og_title": wide, "og_url": url})
    report["redirects"] = [{"url": url, "status": 302, "location": url, "kind": "http"}] * 20
    report["headers"] = {f"x-{i}": "\u00ff" * 2048 for i in range(100)}
    report["requested_url"] = url
    assert reportfit.encoded_size(report) > 1 << 20
    fitted = reportfit.fit(report, cap)
    assert reportfit.encoded_size(fitted) + 1 <= cap
    Report.model_validate_json(json.dumps(fitted))
    assert fitted["truncated"]["features.images"] > 0
    assert fitted["truncated"]["headers"] > 0
    if cap >= 65536:
        assert fitted["features"]["forms"] and fitted["redirects"] and fitted["headers"]


def test_fit_leaves_a_small_report_alone() -> None:
    report = _report(forms=[{"action": "http://a.test/", "method": "get"}], text="hi")
    assert reportfit.fit(report) == report


def test_a_failing_feature_costs_only_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(htmlscan._Extractor, "_images", broken)
    page = scan("<title>T</title><img src=a.png><form><input type=password></form>")
    assert page.parse == "partial" and page.parse_problem == "images not read: RuntimeError"
    assert page.title == "T" and page.forms[0]["has_password"] and page.images == []


def test_extraction_has_its_own_deadline() -> None:
    html = "<title>T</title>" + "<form><input type=password></form>" * 2000
    page = htmlscan._Extractor(htmlscan.parse_bounded(html, 5)[0], BASE,
                               deadline=time.monotonic() - 1).run()
    assert page.parse == "partial" and "while extracting" in (page.parse_problem or "")
