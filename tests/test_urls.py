"""URL handling on the worker side (safeurl_worker/urls.py), and the agreement of every part
of the project on which host a URL names.

The fetcher (netcheck), the worker's refusal check (pipeline.url_problem), the analysis
(urls.host_of / site_of), the blocklist and the result-cache key (urls.normalize_url) all parse
with `fetcher.weburl`; the agreement test runs tricky URLs through each of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from safeurl_worker import urls
from safeurl_worker.blocklist import Blocklist
from safeurl_worker.fetcher import netcheck
from safeurl_worker.pipeline import url_key, url_problem
from safeurl_worker.urls import normalize_url

# --- normalize_url (the result-cache and blocklist key) ---------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("HTTP://Example.COM", "http://example.com/"),
    ("https://example.com:443/a?b=1#frag", "https://example.com/a?b=1"),
    ("http://example.com:80/", "http://example.com/"),
    ("http://example.com:8080", "http://example.com:8080/"),
    ("https://example.com:80/", "https://example.com:80/"),
    ("http://bücher.de/x y", "http://xn--bcher-kva.de/x%20y"),
    ("http://пример.рф/путь?q=я",
     "http://xn--e1afmkfd.xn--p1ai/%D0%BF%D1%83%D1%82%D1%8C?q=%D1%8F"),
    ("http://user:pw@EXAMPLE.com/", "http://user:pw@example.com/"),
    ("http://0x7f.1/", "http://127.0.0.1/"),
    ("http://[::FFFF:1]:80/", "http://[::ffff:1]/"),
    ("http://example.com./p%2fq", "http://example.com/p%2Fq"),
    ("http://%65xample.com/", "http://example.com/"),
    ("  https://example.com/Path/?Q=A  ", "https://example.com/Path/?Q=A"),
    ("https://example.com?x", "https://example.com/?x"),
    # browser semantics the urlsplit-based key got wrong
    ("http://fa\u00df.de/", "http://xn--fa-hia.de/"),  # UTS #46 nontransitional
    ("http://evil.test\\@good.example/", "http://evil.test/@good.example/"),
    ("http:\\\\example.com\\a\\b", "http://example.com/a/b"),
    ("http:example.com", "http://example.com/"),
    ("http:///example.com/", "http://example.com/"),
    ("http://example.com/a/./b/../c", "http://example.com/a/c"),
    ("http://ex\tam\nple.com/", "http://example.com/"),
    ("http://@example.com/", "http://example.com/"),
    ("http://a\u3002b.com/", "http://a.b.com/"),
    ("http://192.168.257/", "http://192.168.1.1/"),
])
def test_normalize_url(url: str, expected: str) -> None:
    assert normalize_url(url) == expected
    assert normalize_url(expected) == expected  # idempotent


@pytest.mark.parametrize("url", ["", "   ", "example.com", "/relative", "mailto:a@b.test",
                                 "http://[::1", "http://a.b:99999/", "http://exa mple.com/",
                                 "http://:80/", "http://[v1.x]/", "\x00",
                                 "http://[fe80::1%25eth0]/", "http://\ud800.com/",
                                 "http://xn--a.com/", "http://1.2.3.4.5/", "file:///etc/passwd"])
def test_normalize_url_rejects_unparsable(url: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        normalize_url(url)


@pytest.mark.parametrize("url", ["http://a.com/\ud800", "http://" + "ä" * 70 + ".com/",
                                 "http://@host/", "ftp://x.test:21/", "http://a..b/",
                                 "foo://Opaque.Host/p"])
def test_normalize_url_odd_but_valid(url: str) -> None:
    key = normalize_url(url)
    assert key.isascii()
    assert normalize_url(key) == key  # idempotent


def test_normalize_url_refuses_non_strings() -> None:
    with pytest.raises(ValueError, match="string"):
        normalize_url(b"http://x/")


# --- host_of, site_of, registrable_domain, canonical_host, canonical_ip -----------------------


@pytest.mark.parametrize(("url", "host", "site"), [
    ("https://www.Example.co.uk./x", "www.example.co.uk", "example.co.uk"),
    ("https://a.b.paypal.com.evil.example/", "a.b.paypal.com.evil.example", "evil.example"),
    ("http://0x7f.1/", "127.0.0.1", "127.0.0.1"),
    ("http://[2001:db8::1]/", "2001:db8::1", "2001:db8::1"),
    ("http://localhost:8080/", "localhost", "localhost"),
    ("http://user.github.io/", "user.github.io", "user.github.io"),  # private suffix
    ("http://fa\u00df.de/", "xn--fa-hia.de", "xn--fa-hia.de"),
    ("http://evil.test\\@good.example/", "evil.test", "evil.test"),
])
def test_host_and_site(url: str, host: str, site: str) -> None:
    assert urls.host_of(url) == host
    assert urls.site_of(url) == site
    assert urls.registrable_domain(host) == site


@pytest.mark.parametrize("url", [None, "", "not a url", "http://[::1", "mailto:a@b.test"])
def test_host_of_is_none_for_no_host(url: str | None) -> None:
    assert urls.host_of(url) is None
    assert urls.site_of(url) is None


def test_canonical_host_and_ip() -> None:
    assert urls.canonical_host(" Example.COM. ") == "example.com"
    assert urls.canonical_host("%65vil.test") == "evil.test"
    assert urls.canonical_host("0xc0.0.2.7") == "192.0.2.7"
    assert urls.canonical_host("::FFFF:1") == "::ffff:1"
    for bad in ("", "a b", "a/b", "xn--a", "evil.test:80"):
        with pytest.raises(ValueError):
            urls.canonical_host(bad)
    assert urls.canonical_ip("2130706433") == "127.0.0.1"
    assert urls.canonical_ip("[::1]") == "::1"
    assert urls.canonical_ip("example.com") is None
    assert urls.canonical_ip("1.2.3.4.5") is None


def test_parse_url_and_raw_host() -> None:
    parsed = urls.parse_url("http://us:pw@0x7f.1:8080/a?b#c")
    assert (parsed.host, parsed.port, parsed.userinfo, parsed.has_userinfo) == \
        ("127.0.0.1", 8080, "us:pw", True)
    assert urls.raw_host("http://us:pw@0x7f.1:8080/a") == "0x7f.1"
    assert urls.raw_host("http://evil.test\\@good.example/") == "evil.test"
    assert urls.raw_host("//x.example/", "https") == "x.example"
    assert urls.raw_host("/relative", "https") is None


# --- one host for everyone ------------------------------------------------------------------

# (url, the host a browser goes to, or None where the fetcher refuses the URL)
TRICKY: list[tuple[str, str | None]] = [
    ("http://evil.test\\@good.example/", "evil.test"),
    ("http://good.example@evil.test/", "evil.test"),
    ("http://good.example:pw@evil.test:443/", "evil.test"),
    ("http://evil.test#@good.example/", "evil.test"),
    ("http://evil.test?@good.example/", "evil.test"),
    ("http:\\\\evil.test\\x", "evil.test"),
    ("http:evil.test/x", "evil.test"),
    ("http:///evil.test/x", "evil.test"),
    ("https:/\\evil.test/", "evil.test"),
    ("  HTTP://EVIL.test./  ", "evil.test"),
    ("http://ev\til.te\nst/", "evil.test"),
    ("http://%65vil.test/", "evil.test"),
    ("http://\uff45\uff56\uff49\uff4c.test/", "evil.test"),  # fullwidth letters
    ("http://ev\u00adil.test/", "evil.test"),  # soft hyphen: ignored
    ("http://evil\u3002test/", "evil.test"),  # ideographic full stop
    ("http://fa\u00df.de/", "xn--fa-hia.de"),
    ("http://FA\u00df.DE/", "xn--fa-hia.de"),
    ("http://xn--fa-hia.de/", "xn--fa-hia.de"),
    ("http://\u0dc1\u0dca\u200d\u0dbb\u0dd3.test/", "xn--10cl1a0b660p.test"),
    ("http://b\u00fccher.test/", "xn--bcher-kva.test"),
    ("http://0x7f.1/", "127.0.0.1"),
    ("http://2130706433/", "127.0.0.1"),
    ("http://192.168.257/", "192.168.1.1"),
    ("http://%31%32%37.0.0.1/", "127.0.0.1"),
    ("http://[::ffff:127.0.0.1]/", "::ffff:7f00:1"),
    ("http://[0:0::1]:80/", "::1"),
    ("http://a_b.evil.test/", "a_b.evil.test"),
    # refused by the fetcher, so by the worker too (and no key)
    ("http://1.2.3.-4/", None),
    ("http://a..b/", None),
    ("http://xn--a.test/", None),
    ("http://1.2.3.4.5/", None),
    ("http://evil.test:99999/", None),
    ("ftp://evil.test/", None),
    ("javascript:alert(1)", None),
    ("http://exa mple.test/", None),
]


@pytest.mark.parametrize(("url", "host"), TRICKY)
def test_fetcher_analysis_blocklist_and_cache_key_agree(tmp_path: Path, url: str,
                                                        host: str | None) -> None:
    # the fetcher: the host it resolves and connects to, and the final URL it reports
    try:
        fetched: netcheck.ParsedUrl | None = netcheck.parse_url(url)
    except netcheck.UrlError:
        fetched = None
    # the worker refuses before any container exactly what the fetcher would refuse
    assert (url_problem(url) is None) == (fetched is not None)
    if host is None:
        assert fetched is None
        return
    assert fetched is not None and fetched.host == host
    key = url_key(url)
    assert key is not None
    for seen in (url, key, fetched.serialize()):
        assert urls.host_of(seen) == host  # the analysis, on the URL, the key, the final URL
        assert urls.site_of(seen) == urls.registrable_domain(host)
    entry = f"[{host}]" if ":" in host else host
    (tmp_path / "domain.txt").write_text(f"{entry}\n")
    by_domain = Blocklist(tmp_path / "domain.txt", check_interval_s=0)
    for seen in (url, key, fetched.serialize()):  # the blocklist follows the fetcher's hop
        assert by_domain.match(seen) == entry
    (tmp_path / "url.txt").write_text(f"{key}\n")
    by_url = Blocklist(tmp_path / "url.txt", check_interval_s=0)
    assert by_url.match(url) == key
    if not urls.parse_url(url).has_userinfo:  # the request never carries userinfo
        assert by_url.match(fetched.serialize()) == key


def test_table_is_big_enough() -> None:
    assert len(TRICKY) >= 30
