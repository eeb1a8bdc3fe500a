"""The monitoring artefacts match what the worker really exports.

* deploy/grafana/safeurl-dashboard.json and deploy/prometheus/alerts.yml reference only metric
  names that `safeurl_worker.metrics.Metrics` exports (derived from its registry, not a list);
* the alert rules and their unit tests pass `promtool` (Debian package `prometheus`, installed by
  scripts/setup.sh);
* stream-wide gauges are never summed over replicas;
* every alert has a severity, a summary, a description and a runbook whose docs anchor exists.

No services needed; the promtool runs take well under a second.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from safeurl_worker.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "safeurl-dashboard.json"
PROM_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
OPERATIONS = ROOT / "docs" / "operations.md"

METRIC_RE = re.compile(r"\bsafeurl_[a-z_]+")
# sum(...) / sum by (...) (...) directly over a stream-wide gauge double-counts it per replica.
SUMMED_STREAM_GAUGE_RE = re.compile(
    r"\bsum\s*(?:(?:by|without)\s*\([^)]*\)\s*)?\(\s*safeurl_stream_(?:lag|pending)\b")


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every sample name a replica can export, read from a fresh Metrics() registry.

    Labelled metrics export no sample until a label set is used, so give each one a child
    first; the sample names (with `_total`, `_bucket`, `_created`, ...) then come from
    prometheus_client itself."""
    m = Metrics()
    for metric in vars(m).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*["x"] * len(metric._labelnames))
    names: set[str] = set()
    for family in m.registry.collect():
        assert family.samples, f"metric family {family.name} exports no sample"
        names.update(s.name for s in family.samples)
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def _exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dash) for t in p.get("targets", []) if t.get("expr")]


def _alert_blocks() -> dict[str, str]:
    """alert name -> its text (up to the next rule), without a YAML library."""
    parts = re.split(r"^\s*- alert:\s*", ALERTS.read_text(), flags=re.M)[1:]
    return {p.split("\n", 1)[0].strip(): p for p in parts}


def _unknown(text: str, exported: set[str]) -> set[str]:
    return set(METRIC_RE.findall(text)) - exported


# --- dashboard --------------------------------------------------------------------------------


def test_exported_names_look_like_prometheus_client_output(exported: set[str]) -> None:
    # A sanity check of the derivation (not the source of truth): suffixes are appended.
    assert "safeurl_jobs_total" in exported
    assert "safeurl_job_duration_seconds_bucket" in exported
    assert "safeurl_stream_lag" in exported


def test_dashboard_references_only_exported_metrics(dashboard: dict[str, Any],
                                                    exported: set[str]) -> None:
    exprs = _exprs(dashboard)
    used = {name for e in exprs for name in METRIC_RE.findall(e)}
    assert len(used) >= 10, f"the dashboard queries suspiciously few metrics: {sorted(used)}"
    unknown = used - exported
    assert not unknown, (f"dashboard queries metrics the worker does not export: "
                         f"{sorted(unknown)}; exported: {sorted(exported)}")


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = [p for p in _panels(dashboard) if p["type"] != "row"]
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
    exprs = "\n".join(_exprs(dashboard))
    for q in ("0.5", "0.95", "0.99"):
        assert re.search(rf"histogram_quantile\({q}, sum by \(le, stage\) "
                         r"\(rate\(safeurl_job_duration_seconds_bucket", exprs), q


def test_stream_gauges_are_never_summed(dashboard: dict[str, Any]) -> None:
    # Every replica reports the same stream-wide value: sum() would multiply it by the fleet size.
    for source, text in (("dashboard", "\n".join(_exprs(dashboard))),
                         ("alerts.yml", ALERTS.read_text())):
        assert not SUMMED_STREAM_GAUGE_RE.search(text), f"{source} sums a stream-wide gauge"


# --- alert rules ------------------------------------------------------------------------------


def test_alert_files_reference_only_exported_metrics(exported: set[str]) -> None:
    # Whole files, not only `expr:`: comments, annotations and test series must not name
    # metrics that do not exist either.
    for path in (ALERTS, ALERTS_TEST):
        unknown = _unknown(path.read_text(), exported)
        assert not unknown, (f"{path.relative_to(ROOT)} names metrics the worker does not "
                             f"export: {sorted(unknown)}")


def test_alerts_cover_the_failure_modes_and_carry_runbooks() -> None:
    blocks = _alert_blocks()
    for name in ("SafeURLStreamLagGrowing", "SafeURLNoCompletions", "SafeURLHighFailureRatio",
                 "SafeURLDeadLetters", "SafeURLWorkerNotReady", "SafeURLWorkerDown",
                 "SafeURLPendingNotReclaimed", "SafeURLTransientErrorBurst"):
        assert name in blocks, f"alert {name} missing from alerts.yml"
    docs = OPERATIONS.read_text()
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+\s+(.+)$", docs, flags=re.M)}
    for name, block in blocks.items():
        assert re.search(r"^\s+severity: (critical|warning|info)\s*$", block, re.M), name
        for key in ("summary", "description", "runbook"):
            assert re.search(rf"^\s+{key}:", block, re.M), f"{name}: no {key} annotation"
        flat = " ".join(block.split())  # folded YAML: a command may wrap across lines
        assert re.search(r"`safeurl-worker (status|check|retry|dlq)\b", flat), (
            f"{name}: the runbook names no safeurl-worker command")
        for anchor in re.findall(r"docs/operations\.md#([a-z0-9_-]+)", block):
            assert anchor in anchors, f"{name}: docs/operations.md has no #{anchor} heading"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found on PATH: run scripts/setup.sh (it installs the Debian "
                    "package `prometheus`, which provides promtool)", pytrace=False)
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60,
                          cwd=PROM_DIR)


@pytest.mark.parametrize("args", [
    ("check", "rules", ALERTS.name),
    ("test", "rules", ALERTS_TEST.name),
    ("check", "config", PROM_CONFIG.name),
], ids=["check-rules", "test-rules", "check-config"])
def test_promtool(args: tuple[str, ...]) -> None:
    out = _promtool(*args)
    assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
