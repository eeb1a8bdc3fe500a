"""The real fetcher image, locked down as the worker runs it, with no network at all.

Address literals must be refused by the program itself (BLOCKED_TARGET), bad schemes rejected
(INVALID_URL), and a name that cannot be resolved must still give a report (DNS_FAILED).
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from safeurl_worker.models import Report
from tests.test_fetcher_netcheck import BLOCKED_LITERALS, INVALID

pytestmark = pytest.mark.integration

IMAGE = os.environ.get("FETCHER_IMAGE", "safeurl-fetcher:latest")
LOCKED_DOWN = ["--rm", "--network", "none", "--read-only", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges", "--user", "65534:65534",
               "--memory", "256m", "--pids-limit", "64", "--tmpfs", "/tmp:size=16m"]


def _image_present() -> bool:
    try:
        out = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


if not _image_present():
    pytest.skip(f"{IMAGE} not built (scripts/build-images.sh)", allow_module_level=True)


def run_image(url: str, *env: str) -> tuple[int, str, str]:
    env_args = [a for e in env for a in ("-e", e)]
    out = subprocess.run(["docker", "run", *LOCKED_DOWN, *env_args, IMAGE, url],
                         capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout, out.stderr


def run_many(urls: list[str]) -> dict[str, Report]:
    """Six containers at a time; each stdout must be exactly one valid report, exit 0."""
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = dict(zip(urls, pool.map(run_image, urls), strict=True))
    reports: dict[str, Report] = {}
    for url, (code, stdout, stderr) in results.items():
        assert code == 0, f"{url!r}: exit {code}: {stderr}"
        lines = stdout.splitlines()
        assert len(lines) == 1, f"{url!r}: {stdout!r}"
        reports[url] = Report.model_validate_json(lines[0])
    return reports


def test_blocked_and_invalid_urls_in_the_image() -> None:
    # the empty URL is a separate case: docker passes "" fine, but keep the table to real URLs
    invalid = [u for u in INVALID if u]
    reports = run_many([u for u, _ in BLOCKED_LITERALS] + invalid)
    for url, why in BLOCKED_LITERALS:
        error = reports[url].error
        assert error is not None and error.code == "BLOCKED_TARGET", (url, error)
        assert why in error.message, (url, error.message)
    for url in invalid:
        error = reports[url].error
        assert error is not None and error.code == "INVALID_URL", (url, error)


def test_named_host_without_network_is_dns_failed() -> None:
    code, stdout, stderr = run_image("http://example.com/", "FETCH_TIMEOUT_S=5")
    assert code == 0, stderr
    report = Report.model_validate_json(stdout)
    assert report.error is not None and report.error.code == "DNS_FAILED"
    assert report.final_url is None


def test_image_runs_as_nobody_from_a_read_only_root() -> None:
    """The program needs no writable path: a normal scan works as 65534 with / read-only."""
    code, stdout, _ = run_image("http://[::1]:80/", "FETCH_ALLOW_CIDRS=::1/128")
    assert code == 0
    report = Report.model_validate_json(stdout)
    # allowed by the CIDR, so it really tries to connect - and --network none has no route
    assert report.error is not None and report.error.code == "CONNECT_FAILED"


PROBE = r"""
import gzip, json, sys, time
sys.path.insert(0, "/app")
from fetcher import content, htmlscan, weburl
import selectolax, webencodings, idna, ada_url
out = {}
page = htmlscan.scan_html("<title>T</title><!-- --!><h1>PayPal</h1><![x[><form>"
                          "<input type=password></form>", "http://kit.test/")
out["tricks"] = [page.headings, page.forms[0]["has_password"], page.parse]
out["utf16"] = content.decode_html(b"<meta charset=utf-16><p>\xc3\xa9", None)
bomb = content.decode_content(gzip.compress(b" " * (64 << 20)), "gzip", 1 << 20)
out["bomb"] = [len(bomb.body), bomb.partial]
start = time.monotonic()
deep = htmlscan.scan_html("<title>D</title>" + "<div>" * 300000, "http://kit.test/", 2.0)
out["deep"] = [deep.parse, deep.title, round(time.monotonic() - start, 2)]
print(json.dumps(out))
"""


def test_image_parses_like_a_browser_within_its_bounds() -> None:
    """The image's own Python and wheels (selectolax, webencodings, idna, ada-url) import as
    nobody from a read-only root, and the bounds hold under the worker's CPU share."""
    out = subprocess.run(["docker", "run", *LOCKED_DOWN, "--cpus", "0.5", "--entrypoint",
                          "python3", IMAGE, "-s", "-E", "-c", PROBE],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout)
    assert probe["tricks"] == [["PayPal"], True, "full"]
    assert probe["utf16"] == ["<meta charset=utf-16><p>\u00e9", "utf-8"]
    assert probe["bomb"] == [1 << 20, True]
    parse, title, seconds = probe["deep"]
    assert (parse, title) == ("partial", "D") and seconds < 2.0 * 1.3 + 1.0
