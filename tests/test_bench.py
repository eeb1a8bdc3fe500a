"""The benchmark harness (bench/harness.py) and smoke runs of `python -m bench`: short runs of
parts 1 and 2 produce sane figures, every round, and their spread. Not a speed test (timed
assertions are flaky on shared machines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.harness import alternate, percentile, ratios, read_proc, show, spread, summarize

from .conftest import ROOT, TestNet


def test_percentile_is_nearest_rank_on_unsorted_input() -> None:
    values = [float(x) for x in range(100, 0, -1)]
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.95) == 95
    assert percentile(values, 0.99) == 99
    assert percentile([7.0], 0.99) == 7.0


def test_rounds_alternate_and_ratios_are_taken_within_a_round() -> None:
    calls: list[str] = []
    figures = {"a": iter([100.0, 300.0, 200.0]), "b": iter([50.0, 300.0, 50.0])}

    def run(name: str) -> dict[str, Any]:
        calls.append(name)
        return {"jobs_per_s": next(figures[name]), "system": name, "missing": None}

    rounds = alternate(3, {"a": lambda: run("a"), "b": lambda: run("b")})
    assert calls == ["a", "b"] * 3
    s = summarize(rounds)
    assert s["a"]["jobs_per_s"] == {"median": 200.0, "min": 100.0, "max": 300.0}
    assert set(s["a"]) == {"jobs_per_s"}  # text and None are not figures
    # Per round: 2, 1, 4 -> median 2; the ratio of the medians would be 200/50 = 4.
    assert ratios(rounds, "a", "jobs_per_s") == {"b": {"median": 2.0, "min": 1.0, "max": 4.0}}
    assert show(spread([1.0, 3.0, 2.0]), ".1f") == "2.0 (1.0-3.0)"


def test_read_proc_reads_this_process_and_none_for_a_gone_one() -> None:
    me = read_proc(os.getpid())
    assert me is not None and me.cpu_s > 0 and 1 < me.rss_mb < 4096
    assert "python" in me.comm or "pytest" in me.comm or "python" in me.cmdline
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert read_proc(gone.pid) is None


def _bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench", "--rounds", "2", "--out", str(tmp_path),
                          *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "results.png").stat().st_size > 1000
    res: dict[str, Any] = json.loads((tmp_path / "results.json").read_text())
    res["stdout"] = out.stdout
    return res


def _sane(s: dict[str, float]) -> None:
    assert 0 < s["min"] <= s["median"] <= s["max"]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bench_part1_rounds_and_spread(tmp_path: Path) -> None:
    res = _bench(tmp_path, "--parts", "1", "--jobs", "100", "--concurrency", "10",
                 "--systems", "saq")
    assert "no-op path, 100 jobs, concurrency 10, 2 rounds" in res["stdout"]
    p = res["part1"]
    assert len(p["rounds"]) == 2
    for r in p["rounds"]:
        assert list(r) == ["safeurl", "saq"]
        for row in r.values():
            assert row["jobs"] == 100 and row["jobs_per_s"] > 0
            assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    for name in ("safeurl", "saq"):
        for fig in ("jobs_per_s", "p50_ms", "p99_ms", "rss_mb", "cpu_ms_per_job"):
            _sane(p["summary"][name][fig])
    assert p["summary"]["safeurl"]["rss_mb"]["max"] < 1000
    _sane(p["ours_ratio"]["saq"])
    per_round = sorted(r["safeurl"]["jobs_per_s"] / r["saq"]["jobs_per_s"] for r in p["rounds"])
    assert p["ours_ratio"]["saq"]["min"] == pytest.approx(per_round[0])


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bench_part2_rounds_and_spread(tmp_path: Path, testnet: TestNet) -> None:
    res = _bench(tmp_path, "--parts", "2", "--scans", "2", "--container-concurrency", "1")
    assert "container path, 2 scans/level" in res["stdout"]
    [level] = res["part2"]["levels"]
    assert level["concurrency"] == 1 and len(level["rounds"]) == 2
    for side in ("worker", "docker_run"):
        _sane(level["summary"][side]["scans_per_s"])
    _sane(level["ratio"])


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bench_part8_lanes_rounds_and_spread(tmp_path: Path) -> None:
    res = _bench(tmp_path, "--parts", "8", "--flood-jobs", "40", "--interactive-jobs", "4",
                 "--job-seconds", "0.05", "--lane-systems", "lanes,one_lane,no_flood")
    assert "bulk flood (40 jobs of 0.05 s, 4 interactive, concurrency 4, 2 rounds)" in \
        res["stdout"]
    p = res["part8"]
    assert p["lanes"] == "interactive:6,default:3,bulk:1" and len(p["rounds"]) == 2
    for r in p["rounds"]:
        assert list(r) == ["lanes", "one_lane", "no_flood"]
        for name, row in r.items():
            assert row["interactive"] == 4
            assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p99_ms"] == row["max_ms"]
            # Each interactive job ran its 50 ms stub job between submit and terminal.
            assert row["min_ms"] >= 50
            assert (row["bulk_per_s"] > 0) is (name != "no_flood")
    for name in ("lanes", "one_lane"):
        for fig in ("p50_ms", "p99_ms", "max_ms", "bulk_per_s"):
            _sane(p["summary"][name][fig])
    for other in ("one_lane", "no_flood"):
        _sane(p["ratio"]["p50_ms"][other])
        per_round = sorted(r["lanes"]["p50_ms"] / r[other]["p50_ms"] for r in p["rounds"])
        assert p["ratio"]["p50_ms"][other]["min"] == pytest.approx(per_round[0])
