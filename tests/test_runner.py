"""The container runner: report parsing (pure) and the sandbox configuration."""

from __future__ import annotations

import uuid

import orjson

from safeurl_worker.config import load_settings
from safeurl_worker.runner import LABEL_JOB, LABEL_WORKER, RunStatus, container_config, parse_report

GOOD = {"fetcher_version": "1.0", "requested_url": "http://a.test/", "final_url": "http://a.test/",
        "http_status": 200, "body_size": 3, "error": None}


def test_valid_report_parses() -> None:
    r = parse_report(orjson.dumps(GOOD) + b"\n", 1 << 20)
    assert r.status is RunStatus.OK and r.report is not None
    assert r.report.http_status == 200


def test_output_over_cap_is_invalid() -> None:
    r = parse_report(orjson.dumps(GOOD) + b" " * 5000, 4096)
    assert r.status is RunStatus.OUTPUT_INVALID and "over" in r.detail


def test_not_json_empty_and_unknown_keys_are_invalid() -> None:
    assert parse_report(b"hello", 4096).status is RunStatus.OUTPUT_INVALID
    assert parse_report(b"", 4096).status is RunStatus.OUTPUT_INVALID
    extra = parse_report(orjson.dumps({**GOOD, "surprise": 1}), 4096)
    assert extra.status is RunStatus.OUTPUT_INVALID and "surprise" in extra.detail
    two = parse_report(orjson.dumps(GOOD) + b"\n" + orjson.dumps(GOOD), 4096)
    assert two.status is RunStatus.OUTPUT_INVALID


def test_sandbox_settings() -> None:
    s = load_settings(container_memory_limit_mb=256, container_cpu_limit=0.5,
                      redis_password="s3cret", fetcher_network="none")
    job = uuid.uuid4()
    c = container_config(s, job, "http://a.test/")
    hc = c["HostConfig"]
    assert c["Cmd"] == ["http://a.test/"]
    assert c["User"] == "65534:65534"
    assert c["Labels"] == {LABEL_JOB: str(job), LABEL_WORKER: s.worker_id}
    assert hc["Memory"] == hc["MemorySwap"] == 256 * 1024 * 1024
    assert hc["NanoCpus"] == 500_000_000
    assert hc["ReadonlyRootfs"] is True and hc["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in hc["SecurityOpt"]
    assert hc["PidsLimit"] > 0 and "/tmp" in hc["Tmpfs"]
    assert hc["Binds"] == [] and hc["NetworkMode"] == "none" and c["NetworkDisabled"] is True
    assert not any("s3cret" in e for e in c["Env"])
