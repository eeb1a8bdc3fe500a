"""The operator blocklist (safeurl_worker/blocklist.py): entries, matching, reloading.

Entries and URLs go through the same WHATWG parser as the fetcher (`fetcher.weburl`), so an
entry blocks the host a browser (and our fetcher) would really go to.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from safeurl_worker.blocklist import Blocklist

BLOCKLIST = """\
# operator blocklist
evil.test            # whole domain
*.wild.test
https://Good.Example.org/phish?id=1#frag

not a valid entry
"""


def blocklist_file(tmp_path: Path, text: str) -> Blocklist:
    path = tmp_path / "blocklist.txt"
    path.write_text(text)
    return Blocklist(path, check_interval_s=0)


def test_domain_and_subdomains(tmp_path: Path) -> None:
    bl = blocklist_file(tmp_path, BLOCKLIST)
    assert bl.match("http://evil.test/") == "evil.test"
    assert bl.match("https://a.b.EVIL.test./x") == "evil.test"
    assert bl.match("https://cdn.evil.test/a") == "evil.test"
    assert bl.match("https://x.wild.test/") == "*.wild.test"
    assert bl.match("https://notevil.test/") is None
    assert bl.match("https://evil.test.example.com/") is None
    assert bl.entry_count == 4  # "not a valid entry": the first word is the entry, "not"


def test_exact_url(tmp_path: Path) -> None:
    bl = blocklist_file(tmp_path, BLOCKLIST)
    entry = "https://Good.Example.org/phish?id=1#frag"
    assert bl.match("HTTPS://good.example.org:443/phish?id=1") == entry
    assert bl.match("https://good.example.org/x/../phish?id=1#other") == entry  # dot segments
    assert bl.match("https://good.example.org/phish?id=2") is None
    assert bl.match("https://good.example.org/") is None


def test_evasive_spellings(tmp_path: Path) -> None:
    bl = blocklist_file(tmp_path, "evil.test\n192.0.2.7\nпример.рф\n")  # noqa: RUF001
    assert bl.match("http://%65vil.test/") == "evil.test"
    assert bl.match("http://\uff45\uff56\uff49\uff4c.test/") == "evil.test"  # fullwidth
    assert bl.match("http://ev\u00adil.test/") == "evil.test"  # soft hyphen is ignored
    assert bl.match("http:\\\\evil.test\\x") == "evil.test"
    assert bl.match("http:evil.test") == "evil.test"
    assert bl.match("http://0xc0.0.2.7/") == "192.0.2.7"
    assert bl.match("http://3221225991/") == "192.0.2.7"
    assert bl.match("http://xn--e1afmkfd.xn--p1ai/") == "пример.рф"


def test_the_host_is_the_one_a_browser_goes_to(tmp_path: Path) -> None:
    # The case: urlsplit saw good.example, the fetcher (and a browser) go to evil.test.
    bl = blocklist_file(tmp_path, "evil.test\n")
    assert bl.match("http://evil.test\\@good.example/") == "evil.test"
    assert bl.match("http://good.example@evil.test/") == "evil.test"
    assert bl.match("http://evil.test#@good.example/") == "evil.test"
    decoy = blocklist_file(tmp_path, "good.example\n")
    assert decoy.match("http://evil.test\\@good.example/") is None


def test_uts46_nontransitional(tmp_path: Path) -> None:
    bl = blocklist_file(tmp_path, "faß.de\n")
    assert bl.match("http://xn--fa-hia.de/") == "faß.de"
    assert bl.match("http://FAß.de/") == "faß.de"
    assert bl.match("http://fass.de/") is None  # IDNA 2003 would have merged the two


def test_invalid_entries_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="safeurl_worker.blocklist"):
        bl = blocklist_file(tmp_path, "xn--a.test\nhttp://[::1\na/b\nok.test\nmailto:x@y.test\n")
    assert bl.entry_count == 1
    assert any("ignored 4 invalid entries" in r.getMessage() for r in caplog.records)


def test_reloads_when_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "bl.txt"
    path.write_text("one.test\n")
    bl = Blocklist(str(path), check_interval_s=0)
    assert bl.match("https://one.test/") == "one.test"
    assert bl.match("https://two.test/") is None
    path.write_text("two.test\n")  # same size: only the mtime tells
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert bl.match("https://one.test/") is None
    assert bl.match("https://two.test/") == "two.test"


def test_checks_file_at_most_once_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "bl.txt"
    path.write_text("one.test\n")
    bl = Blocklist(path, check_interval_s=3600)
    path.write_text("other.test\n")
    assert bl.match("https://one.test/") == "one.test"  # not re-read yet
    bl.refresh(force=True)
    assert bl.match("https://other.test/") == "other.test"


def test_missing_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "absent.txt"
    with caplog.at_level(logging.WARNING, logger="safeurl_worker.blocklist"):
        bl = Blocklist(path, check_interval_s=0)
        assert bl.match("https://evil.test/") is None
        assert bl.match("https://evil.test/") is None
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1  # warned once, not once per check
    assert bl.entry_count == 0
    assert bl  # configured, though empty: still truthy
    path.write_text("evil.test\n")  # appears later: picked up
    assert bl.match("https://evil.test/") == "evil.test"
    path.unlink()  # and disappears again: empty, no crash
    assert bl.match("https://evil.test/") is None


def test_unreadable_file_is_empty(tmp_path: Path) -> None:
    bl = Blocklist(tmp_path, check_interval_s=0)  # a directory cannot be read as a file
    assert bl.match("https://evil.test/") is None


def test_no_path() -> None:
    for path in (None, ""):
        assert Blocklist(path).match("https://evil.test/") is None


def test_match_never_raises_on_odd_input(tmp_path: Path) -> None:
    bl = blocklist_file(tmp_path, BLOCKLIST)
    for odd in ("", "not a url", "http://[::1", "http://x:99999/", "http://\ud800.test/",
                "mailto:a@evil.test", "http://xn--a.evil.test/"):
        assert bl.match(odd) is None
