"""Smoke test of the benchmark command: a short run of parts 1 and 2 produces sane figures.
Not a speed test (timed assertions are flaky on shared machines)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, TestNet

pytestmark = pytest.mark.integration


def test_bench_command_produces_table_json_and_chart(tmp_path: Path, testnet: TestNet) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--parts", "1,2", "--jobs", "500", "--concurrency", "20",
         "--systems", "saq", "--scans", "20", "--container-concurrency", "2",
         "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no-op path, 500 jobs" in out.stdout and "container path" in out.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    ours, saq = res["part1"]["rows"]
    assert ours["system"] == "safeurl" and saq["system"] == "saq"
    for row in (ours, saq):
        assert row["jobs"] == 500 and row["jobs_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert saq["ours_ratio"] > 0
    assert 0 < ours["rss_mb"] < 1000 and ours["cpu_ms_per_job"] > 0
    [c2] = res["part2"]["rows"]
    assert c2["scans"] == 20 and c2["worker_scans_per_s"] > 0 and c2["docker_run_scans_per_s"] > 0
    assert (tmp_path / "results.png").stat().st_size > 1000
