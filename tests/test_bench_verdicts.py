"""`python -m bench.verdicts` and its pages (bench/verdict_pages.py).

The page generator is checked in-process; the command runs for real, bounded to a handful of
pages (real docker: an internal network, the test host, the real fetcher image). Only the shape
of the figures is asserted, never their values: the rules change, the command must not.
"""

from __future__ import annotations

import gzip
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench.verdict_pages import (
    BRANDS,
    HOST_KINDS,
    PHISH_STYLES,
    all_pages,
    ascii_host,
    shared_pages,
    split_of,
    synthetic_pages,
)
from bench.verdicts import OUTCOMES, Outcome, page_key, refresh_hosts, render, select, summarize

from .conftest import ROOT, docker

VERDICTS = {"malicious", "suspicious", "safe", "unknown", "failed"}

# --- the pages (no docker) ----------------------------------------------------------------------


def test_synthetic_pages_cover_brands_styles_and_hosts() -> None:
    pages = synthetic_pages()
    phish = [p for p in pages if p.label == "phish"]
    benign = [p for p in pages if p.label == "benign"]
    assert len(BRANDS) >= 30 and {p.brand for p in phish} == {b.key for b in BRANDS} | {None}
    assert {p.style for p in phish} == {*PHISH_STYLES, "webmail"}
    assert {p.id.rsplit("/", 1)[1] for p in phish if p.brand} == set(HOST_KINDS)
    assert {p.style for p in benign} == {"own_login", "ordinary_login", "mentions"}
    assert {p.url.split(":")[0] for p in phish} == {"http", "https"}
    # Every page is reachable under its own key, and ids are unique.
    assert len({p.id for p in pages}) == len(pages)
    assert len({page_key(p.url) for p in pages}) == len(pages)
    # Homoglyph hosts are real IDNs: Unicode in the URL, punycode on the wire.
    idn = [p for p in phish if p.id.endswith("/homoglyph")]
    unicode = [p for p in idn if not p.host.isascii()]
    assert unicode and all(ascii_host(p.host).startswith("xn--") for p in unicode)
    # A brand's own login page is at one of its own domains; no phish host is.
    for b in BRANDS:
        [own] = [p for p in benign if p.brand == b.key and p.style == "own_login"]
        assert any(own.host == d or own.host.endswith("." + d) for d in b.domains)
    own_domains = {d for b in BRANDS for d in b.domains}
    assert not any(ascii_host(p.host) in own_domains for p in phish)


def test_pages_and_split_are_deterministic() -> None:
    a, b = synthetic_pages(), synthetic_pages()
    assert [(p.id, p.url, p.body) for p in a] == [(p.id, p.url, p.body) for p in b]
    halves = Counter(p.split for p in a)
    assert halves["tune"] > 50 and halves["report"] > 50
    # A brand's pages share a half; the half depends on the group key only.
    by_group: dict[str, set[str]] = {}
    for p in a:
        by_group.setdefault(p.group, set()).add(p.split)
    assert all(len(s) == 1 for s in by_group.values())
    assert split_of("brand:paypal") == split_of("brand:paypal")


def _tiny_corpus(root: Path) -> Path:
    """A corpus dir in the ../shared/corpus format: one gzip news page, one kit page."""
    (root / "benign").mkdir(parents=True)
    (root / "phish").mkdir()
    news = (b"<!doctype html><html><head><title>Council approves new bike lanes</title></head>"
            b"<body><h1>Council approves new bike lanes</h1><p>The city council voted on "
            b"Tuesday.</p><a href='/news'>More news</a></body></html>")
    (root / "benign" / "a1.html.gz").write_bytes(gzip.compress(news))
    (root / "phish" / "paypal.html").write_bytes(
        b"<html><head><title>Log in to your PayPal account</title></head><body>"
        b"<form action='login.php' method='post'><input name='email' type='email'>"
        b"<input name='pass' type='password'><button>Log In</button></form></body></html>")
    (root / "manifest.json").write_text(json.dumps({
        "benign": {"a1.html.gz": "https://news.example-daily.org/2024/05/bike-lanes.html"},
        "phish": {"paypal.html": {"brand": "paypal", "host": "paypal.com-login-check.info"}}}))
    return root


def test_shared_corpus_reader(tmp_path: Path) -> None:
    pages = shared_pages(_tiny_corpus(tmp_path / "corpus"))
    assert [(p.label, p.url) for p in pages] == [
        ("benign", "https://news.example-daily.org/2024/05/bike-lanes.html"),
        ("phish", "http://paypal.com-login-check.info/"),
        ("phish", "https://paypal.com-login-check.info/")]
    assert pages[0].body.startswith(b"<!doctype html>")  # decompressed
    assert pages[1].split == pages[2].split  # one kit page, one half
    assert shared_pages(tmp_path / "absent") == []
    assert len(all_pages(tmp_path / "corpus")) == len(synthetic_pages()) + 3


def test_select_limit_mixes_classes_and_refresh_targets_become_aliases() -> None:
    pages = select(synthetic_pages(), "all", "synthetic", 4)
    assert [p.label for p in pages] == ["phish", "benign", "phish", "benign"]
    [page] = [p for p in synthetic_pages() if p.style == "own_login"][:1]
    moved = type(page)("x", "benign", "synthetic", "http://a.example/", page.body.replace(
        b"<head>", b"<head><meta http-equiv='refresh' content='0; url=http://b.example/x'>"))
    assert refresh_hosts(moved) == {"b.example"}


def test_summary_counts_rates_and_lists_misses_and_false_alarms() -> None:
    pages = synthetic_pages()
    phish = [p for p in pages if p.label == "phish"][:4]
    benign = [p for p in pages if p.label == "benign"][:2]
    sig = [{"name": "brand_impersonation", "weight": 75, "evidence": "x"}]
    outcomes = [Outcome(phish[0], "malicious", score=75, signals=sig),
                Outcome(phish[1], "suspicious", score=40, signals=sig),
                Outcome(phish[2], "safe", score=0),
                Outcome(phish[3], "not_run"),
                Outcome(benign[0], "suspicious", score=35, signals=sig),
                Outcome(benign[1], "failed", detail="timeout: no exit after 30s")]
    summary = summarize(outcomes)
    ph, bn = summary["rows"]["phish/all"], summary["rows"]["benign/all"]
    assert (ph["pages"], ph["malicious"], ph["suspicious"], ph["safe"]) == (3, 1, 1, 1)
    assert ph["rates"]["detected"] == 66.7 and ph["rates"]["malicious"] == 33.3
    assert (bn["pages"], bn["suspicious"], bn["failed"]) == (2, 1, 1)
    assert summary["not_run"] == 1 and summary["rows"]["phish/shared"]["pages"] == 0
    assert summary["signals"]["phish"] == {"brand_impersonation": 2}
    text = render(summary, outcomes)
    misses = text.split("missed phishing")[1].split("phishing only suspicious")[0]
    assert phish[2].url in misses and phish[0].url not in misses
    alarms = text.split("false alarms")[1].split("benign without a verdict")[0]
    assert benign[0].url in alarms and "brand_impersonation(75)" in alarms
    assert "timeout: no exit after 30s" in text.split("benign without a verdict")[1]


# --- the command, for real ----------------------------------------------------------------------


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "bench.verdicts", "--split", "all",
                          "--json", str(tmp_path / "out.json"), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out, json.loads((tmp_path / "out.json").read_text())


def _assert_well_formed(out: subprocess.CompletedProcess[str], res: dict[str, Any],
                        n: int) -> None:
    pages = res["pages"]
    assert len(pages) == n
    for p in pages:
        assert p["verdict"] in VERDICTS and p["label"] in ("phish", "benign")
        # Each page was served at its own name (http and https alike) and scanned.
        assert p["http_status"] == 200 and p["error_code"] is None, p
        assert 0 <= p["score"] <= 100 and all({"name", "weight"} <= set(s) for s in p["signals"])
    rows = res["summary"]["rows"]
    for label in ("phish", "benign"):
        row = rows[f"{label}/all"]
        assert row["pages"] == sum(p["label"] == label for p in pages) > 0
        assert sum(row[k] for k in OUTCOMES) == row["pages"]
        assert all(0.0 <= v <= 100.0 for v in row["rates"].values())
    assert set(res["summary"]["headline"]) >= {"phish_detected", "phish_malicious",
                                               "benign_malicious", "benign_suspicious"}
    assert "phishing detected (malicious or suspicious):" in out.stdout
    assert "false alarms (benign malicious or suspicious):" in out.stdout
    # Nothing of the run is left behind.
    network = re.search(r"network (\S+);", out.stderr)
    assert network is not None
    assert docker("network", "ls", "-q", "--filter", f"name={network.group(1)}") == ""


@pytest.mark.integration
def test_command_on_synthetic_pages(tmp_path: Path) -> None:
    out, res = _run(tmp_path, "--source", "synthetic", "--limit", "6",
                    "--corpus", str(tmp_path / "absent"))
    _assert_well_formed(out, res, 6)
    assert {p["source"] for p in res["pages"]} == {"synthetic"}


@pytest.mark.integration
def test_command_on_a_shared_format_corpus(tmp_path: Path) -> None:
    corpus = _tiny_corpus(tmp_path / "corpus")
    out, res = _run(tmp_path, "--source", "shared", "--corpus", str(corpus))
    _assert_well_formed(out, res, 3)
    assert {p["url"] for p in res["pages"]} == {
        "https://news.example-daily.org/2024/05/bike-lanes.html",
        "http://paypal.com-login-check.info/", "https://paypal.com-login-check.info/"}


@pytest.mark.integration
def test_sigterm_removes_network_and_containers(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "bench.verdicts", "--split", "all",
                             "--source", "synthetic", "--limit", "40", "--concurrency", "1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    line = ""
    deadline = time.monotonic() + 60
    while "network " not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()
    found = re.search(r"network (\S+); fetcher containers labelled (\S+)", line)
    assert found, line
    label = found.group(2)
    while not docker("ps", "-q", "--filter", f"label={label}") and time.monotonic() < deadline:
        time.sleep(0.05)  # until a fetcher is running
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 130
    assert docker("ps", "-aq", "--filter", f"label={label}") == ""
    assert docker("network", "ls", "-q", "--filter", f"name={found.group(1)}") == ""
