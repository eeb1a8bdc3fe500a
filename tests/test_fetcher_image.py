"""The real fetcher image, locked down as the worker runs it, with no network at all.

Address literals must be refused by the program itself (BLOCKED_TARGET), bad schemes rejected
(INVALID_URL), and a name that cannot be resolved must still give a report (DNS_FAILED).
"""

from __future__ import annotations

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
