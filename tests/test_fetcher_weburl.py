"""The one URL parser (fetcher/weburl.py) against the WHATWG URL standard.

The cases are typed in from the web-platform-tests data (url/resources/urltestdata.json and
toascii.json): input, base, and the href (or host) every browser produces, None for a failure.
Nothing is downloaded at test time.
"""

from __future__ import annotations

import pytest

from safeurl_worker.fetcher import weburl
from safeurl_worker.fetcher.weburl import WebUrlError

BASE = "http://example.org/foo/bar"
OTHER = "http://other.com/"

# (input, base, href or None for a parse failure) - from urltestdata.json
URLTESTDATA: list[tuple[str, str | None, str | None]] = [
    ("http://example\t.\norg", BASE, "http://example.org/"),
    ("http://user:pass@foo:21/bar;par?b#c", BASE, "http://user:pass@foo:21/bar;par?b#c"),
    ("https://test:@test", None, "https://test@test/"),
    ("https://:@test", None, "https://test/"),
    ("non-special://test:@test/x", None, "non-special://test@test/x"),
    ("http:foo.com", BASE, "http://example.org/foo/foo.com"),
    ("\t   :foo.com   \n", BASE, "http://example.org/foo/:foo.com"),
    (" foo.com  ", BASE, "http://example.org/foo/foo.com"),
    ("a:\t foo.com", BASE, "a: foo.com"),
    ("http://f:21/ b ? d # e ", BASE, "http://f:21/%20b%20?%20d%20#%20e"),
    ("lolscheme:x x#x x", None, "lolscheme:x x#x%20x"),
    ("http://f:/c", BASE, "http://f/c"),
    ("http://f:0/c", BASE, "http://f:0/c"),
    ("http://f:00000000000000/c", BASE, "http://f:0/c"),
    ("http://f:00000000000000000000080/c", BASE, "http://f/c"),
    ("http://f:b/c", BASE, None),
    ("http://f: /c", BASE, None),
    ("http://f:\n/c", BASE, "http://f/c"),
    ("http://f:fifty-two/c", BASE, None),
    ("http://f:999999/c", BASE, None),
    ("non-special://f:999999/c", BASE, None),
    ("http://f: 21 / b ? d # e ", BASE, None),
    ("", BASE, "http://example.org/foo/bar"),
    ("  \t", BASE, "http://example.org/foo/bar"),
    (":foo.com/", BASE, "http://example.org/foo/:foo.com/"),
    (":foo.com\\", BASE, "http://example.org/foo/:foo.com/"),
    (":#", BASE, "http://example.org/foo/:#"),
    ("#/", BASE, "http://example.org/foo/bar#/"),
    ("#\\", BASE, "http://example.org/foo/bar#\\"),
    ("?", BASE, "http://example.org/foo/bar?"),
    ("/", BASE, "http://example.org/"),
    ("/:23", BASE, "http://example.org/:23"),
    ("\\x", BASE, "http://example.org/x"),
    ("\\\\x\\hello", BASE, "http://x/hello"),
    ("::23", BASE, "http://example.org/foo/::23"),
    ("foo://", BASE, "foo://"),
    ("http://a:b@c:29/d", BASE, "http://a:b@c:29/d"),
    ("http::@c:29", BASE, "http://example.org/foo/:@c:29"),
    ("http://&a:foo(b]c@d:2/", BASE, "http://&a:foo(b%5Dc@d:2/"),
    ("http://::@c@d:2", BASE, "http://:%3A%40c@d:2/"),
    ("http://foo.com:b@d/", BASE, "http://foo.com:b@d/"),
    ("http://foo.com/\\@", BASE, "http://foo.com//@"),
    # hosts: percent-decoding, IPv4 number forms, the "ends in a number" rule, IPv6
    ("http://%30%78%63%30%2e%30%32%35%30.01", OTHER, "http://192.168.0.1/"),
    ("http://%30%78%63%30%2e%30%32%35%30.01%2e", OTHER, "http://192.168.0.1/"),
    ("http://192.168.0.257", OTHER, None),
    ("http://%zz%66%a.com", OTHER, None),
    ("http://%25", OTHER, None),
    ("http://hello%00", OTHER, None),
    ("http://192.0x00A80001", None, "http://192.168.0.1/"),
    ("http://192.168.257", "http://example.com/", "http://192.168.1.1/"),
    ("http://192.168.257.com", "http://example.com/", "http://192.168.257.com/"),
    ("https://0x.0x.0", None, "https://0.0.0.0/"),
    ("http://0x7f.0.0.0x7g", None, "http://0x7f.0.0.0x7g/"),
    ("http://0X7F.0.0.0X7G", None, "http://0x7f.0.0.0x7g/"),
    ("http://1.2.3.4.5", OTHER, None),
    ("http://1.2.3.4.5.", OTHER, None),
    ("http://0..0x300/", None, None),
    ("http://256.256.256.256.256", OTHER, None),
    ("http://1.2.3.08", None, None),
    ("http://1.2.3.09", None, None),
    ("http://09.2.3.4", None, None),
    ("http://01.2.3.4.5", None, None),
    ("http://0x100.2.3.4.", None, None),
    ("http://foo.1.2.3.4", None, None),
    ("http://foo.2.3.4", None, None),
    ("http://foo.09", None, None),
    ("http://foo.0x4", None, None),
    ("http://foo.09..", None, "http://foo.09../"),
    ("http://0999999999999999999/", None, None),
    ("http://foo.0x", None, None),
    ("http://foo.0XFfFfFfFfFfFfFfFfFfAcE123", None, None),
    ("http://[::127.0.0.0.1]", None, None),
    ("http://[0:1:0:1:0:1:0:1]", None, "http://[0:1:0:1:0:1:0:1]/"),
    ("http://[0:f:0:0:f:f:0:0]:80/", None, "http://[0:f::f:f:0:0]/"),
    ("non-special://[1:2::3]:80/", None, "non-special://[1:2::3]:80/"),
    ("non-special://[:80/", None, None),
    ("sc://faß.ExAmPlE/", None, "sc://fa%C3%9F.ExAmPlE/"),  # opaque host: no IDNA
    ("http://ExAmPlE.CoM", OTHER, "http://example.com/"),
    ("http://GOO\u200b\u2060\ufeffgoo.com", OTHER, "http://googoo.com/"),
    ("http://\uff27\uff4f.com", OTHER, "http://go.com/"),
    ("http://\ufdd0zyx.com", OTHER, None),
    ("http://%ef%bc%85%ef%bc%94%ef%bc%91.com", OTHER, None),
    ("http://\u0661\u0662\u0663.com", None, None),  # Bidi rule
    ("https://www.GOoglé.com/./path/../path2/", None, "https://www.xn--googl-fsa.com/path2/"),
]

# (domain, ASCII form or None) - UTS #46 ToASCII as the URL standard runs it (toascii.json)
TOASCII: list[tuple[str, str | None]] = [
    ("aa--", "aa--"),
    ("a\u2020--", "xn--a---kp0a"),
    ("ab--c", "ab--c"),
    ("-x", "-x"),
    ("-\u2020", "xn----xhn"),
    ("-x.xn--zca", "-x.xn--zca"),
    ("-x.\u00df", "-x.xn--zca"),
    ("x-.xn--zca", "x-.xn--zca"),
    ("x..xn--zca", "x..xn--zca"),
    ("xn--a", None),  # invalid Punycode
    ("xn--a.xn--zca", None),
    ("xn--a.\u00df", None),
    ("xn--ls8h=", None),
    ("xn--te\u0161la", None),
    ("xn--zca.xn--zca", "xn--zca.xn--zca"),
    ("xn--zca.\u00df", "xn--zca.xn--zca"),
    ("\u200d.example", None),  # CheckJoiners
    ("xn--1ug.example", None),
    ("\u064aa", None),  # CheckBidi
    ("\u064a.", "xn--mhb."),
    ("1.\u064a", "1.xn--mhb"),
    ("\u064a.1", None),
    ("xn--mhb.1", None),
    ("xn--a-yoc", None),
    ("\u0dc1\u0dca\u200d\u0dbb\u0dd3", "xn--10cl1a0b660p"),  # nontransitional: ZWJ kept
    ("\u0646\u0627\u0645\u0647\u200c\u0627\u06cc", "xn--mgba3gch31f060k"),  # ZWNJ kept
    ("\ufffd.com", None),
    ("xn--zn7c.com", None),
    ("a\u00adb", "ab"),
    ("\u2260", "xn--1ch"),
    ("\u226e", "xn--gdh"),
    ("\u226f", "xn--hdh"),
    # beyond toascii.json: the cases from the issue, and more invalid Punycode
    ("fa\u00df.de", "xn--fa-hia.de"),  # UTS #46 nontransitional, not IDNA 2003's fass.de
    ("xn--", None),
    ("a.xn--", None),
    ("xn--abc-", None),  # decodes to ASCII only
    ("XN--ZCA", "xn--zca"),
]


@pytest.mark.parametrize(("url", "base", "href"), URLTESTDATA)
def test_urltestdata(url: str, base: str | None, href: str | None) -> None:
    if href is None:
        with pytest.raises(WebUrlError):
            weburl.parse(url, base)
    else:
        assert weburl.parse(url, base).href == href


@pytest.mark.parametrize(("domain", "ascii"), TOASCII)
def test_toascii(domain: str, ascii: str | None) -> None:
    for url in (f"https://{domain}/x", f"wss://{domain}:8443/"):
        if ascii is None:
            with pytest.raises(WebUrlError):
                weburl.parse(url)
        else:
            assert weburl.parse(url).host == ascii.rstrip(".")
            assert weburl.parse(url).href.split("/")[2].split(":")[0] == ascii


def test_percent_encoded_joiner_is_kept_too() -> None:
    url = "https://%E0%B7%81%E0%B7%8A%E2%80%8D%E0%B6%BB%E0%B7%93/"
    assert weburl.parse(url).host == "xn--10cl1a0b660p"


@pytest.mark.parametrize(("base", "ref", "joined"), [
    # the Location header of the issue: a browser reads '///' as a new authority
    ("http://good.example/a/b", "///evil.example/x", "http://evil.example/x"),
    ("http://good.example/a/b", "\\\\evil.example\\x", "http://evil.example/x"),
    ("http://good.example/a/b", "/\\evil.example/x", "http://evil.example/x"),
    ("https://good.example/a/b", "//evil.example", "https://evil.example/"),
    ("http://good.example/a/b", "http:evil.example", "http://good.example/a/evil.example"),
    ("https://good.example/a/b", "http:evil.example", "http://evil.example/"),
    ("http://good.example/a/b", "../c/./d?x#y", "http://good.example/c/d?x#y"),
    ("http://good.example/a/b", "?q", "http://good.example/a/b?q"),
    ("http://good.example/a/b", "  /x\t y\n", "http://good.example/x%20y"),
    ("http://good.example/a/b", "javascript:alert(1)", "javascript:alert(1)"),
    ("http://good.example/a/b", "data:text/html,hi", "data:text/html,hi"),
    ("http://good.example/a/b", "//\u0dc1\u0dca\u200d\u0dbb\u0dd3/", "http://xn--10cl1a0b660p/"),
    ("http://good.example/a/b", "http://[::1", None),
    ("http://good.example/a/b", "//xn--a/", None),
    ("not a base", "/x", None),
])
def test_join_like_a_browser(base: str, ref: str, joined: str | None) -> None:
    assert weburl.join(base, ref) == joined


@pytest.mark.parametrize(("url", "host", "kind"), [
    ("http://evil.test\\@good.example/", "evil.test", "domain"),  # '\' ends the authority
    ("http://good.example@evil.test/", "evil.test", "domain"),
    ("http://good.example%40evil.test/", None, None),
    ("http://EXAMPLE.com./", "example.com", "domain"),  # trailing dot: same DNS host
    ("http://[::FFFF:127.0.0.1]:8080/", "::ffff:7f00:1", "ipv6"),
    ("http://2130706433/", "127.0.0.1", "ipv4"),
    ("http://\u3002example\u3002com/", ".example.com", "domain"),  # parsed; not fetched
    ("foo://Ex%41mple/", "Ex%41mple", "opaque"),
    ("mailto:a@b", "", "empty"),
    ("file:///etc/passwd", "", "empty"),
])
def test_canonical_host(url: str, host: str | None, kind: str | None) -> None:
    if host is None:
        with pytest.raises(WebUrlError):
            weburl.parse(url)
        return
    parsed = weburl.parse(url)
    assert (parsed.host, parsed.host_kind) == (host, kind)


def test_weburl_fields_and_key() -> None:
    u = weburl.parse("HTTPS://us%65r:p%61ss@Ex\u00e4mple.COM.:443/a/../b%2fc?Q=%2f#Frag")
    assert (u.scheme, u.username, u.password) == ("https", "us%65r", "p%61ss")
    assert (u.host, u.port, u.effective_port) == ("xn--exmple-cua.com", None, 443)
    assert (u.pathname, u.search, u.hash) == ("/b%2fc", "?Q=%2f", "#Frag")
    assert u.request_target == "/b%2fc?Q=%2f"
    assert u.key() == "https://us%65r:p%61ss@xn--exmple-cua.com/b%2Fc?Q=%2F"
    v = weburl.parse("http://[::1]:8080/")
    assert (v.authority, str(v.ip), v.port) == ("[::1]:8080", "::1", 8080)
    assert weburl.parse("mailto:A@B.example").key() == "mailto:A@B.example"


def test_lone_surrogates_are_replaced_like_a_browser_does() -> None:
    assert weburl.parse("http://a.example/\ud800").pathname == "/%EF%BF%BD"
    assert weburl.parse("http://a.example/\ud83d\ude00").pathname == "/%F0%9F%98%80"
    with pytest.raises(WebUrlError):
        weburl.parse("http://\ud800.example/")


@pytest.mark.parametrize(("text", "host", "kind"), [
    ("Example.COM", "example.com", "domain"),
    ("fa\u00df.de", "xn--fa-hia.de", "domain"),
    ("%65vil.test", "evil.test", "domain"),
    ("0x7f.1", "127.0.0.1", "ipv4"),
    ("::1", "::1", "ipv6"),
    ("[::ffff:1]", "::ffff:1", "ipv6"),
    ("evil.test.", "evil.test", "domain"),
])
def test_parse_host(text: str, host: str, kind: str) -> None:
    assert weburl.parse_host(text) == (host, kind)


def test_signs_before_a_number_fail_in_the_browser_too() -> None:
    for url in ("http://+1.2.3.4/", "http://1.-2.3.4/", "http://0x7f.0.0._1.2/"):
        with pytest.raises(WebUrlError):
            weburl.parse(url)


@pytest.mark.parametrize("text", ["", "a/b", "a:80", "[::1]:80", "a@b", "a b", "xn--a", "[v1.x]",
                                  "1.2.3.4.5", "?", "#x"])
def test_parse_host_refuses(text: str) -> None:
    with pytest.raises(WebUrlError):
        weburl.parse_host(text)


@pytest.mark.parametrize(("url", "problem"), [
    ("http://example.com/", None),
    ("https://a_b.example/", None),  # '_' in a name is fine (not a number)
    ("https://1-800-flowers.example/", None),
    ("ftp://example.com/", "scheme"),
    ("javascript:alert(1)", "scheme"),
    ("http://a..b/", "empty label"),
    ("http://" + "a" * 64 + ".example/", "too long"),
    ("http://" + "a." * 127 + "example/", "too long"),
    ("http://1.2.3.-4/", "IPv4"),
    ("http://1.2.3.+4/", "IPv4"),
    ("http://0x7f.0.0.1_/", "IPv4"),
    ("http://1.2.3._4/", "IPv4"),
    ("http://127.0.0.0x-1/", "IPv4"),
    ("http://-2130706433/", "IPv4"),
])
def test_fetch_problem(url: str, problem: str | None) -> None:
    found = weburl.fetch_problem(weburl.parse(url))
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
