"""Render mode end to end: a real worker, the real fetcher and browser images, PostgreSQL and
Redis, scanning the render test host (tests/testhost/render/server.py) on an internal docker
network this module shares with tests/test_browser_image.py's fixture: `site-a.test` and
`site-b.test` are allowed (FETCH_ALLOW_CIDRS is that host's address only), `refused.test` is on
the same subnet and not allowed, and logs every connection it receives.

Few jobs, concurrently, with one CPU per container: a render takes a few seconds.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as redis
from PIL import Image, ImageStat

from safeurl_worker.config import Settings
from safeurl_worker.store import Store

from .conftest import docker, running_worker
from .helpers import CLI, env_of, labelled_containers, wait_terminal
from .test_browser_image import RenderNet, rendernet  # noqa: F401 - the shared network fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LOGIN = "http://site-a.test/script-login"  # the form exists only after its script ran
HOP = "http://site-a.test/hop"  # 302, then a meta refresh to site-b.test: suspicious statically
IMAGE = "http://site-a.test/refused-image"  # an <img> from refused.test
JOB_S = 120  # per job, queue to terminal, with others rendering beside it


def render_settings(make_settings: Any, net: RenderNet, **overrides: object) -> Settings:
    settings: Settings = make_settings(
        fetcher_network=net.name, fetch_allow_cidrs=f"{net.allowed_ip}/32",
        fetch_allowed_ports="80,443", container_timeout_ms=30000, container_cpu_limit=1.0,
        worker_concurrency=2, **overrides)
    return settings


async def submit(store: Store, rds: redis.Redis, settings: Settings, url: str,
                 mode: str | None = None) -> uuid.UUID:
    """As the API does, with the job's own mode."""
    job_id = await store.insert_job(url, mode=mode)
    await rds.xadd(settings.scan_stream, {"job_id": str(job_id)})
    return job_id


async def result(store: Store, job_id: uuid.UUID) -> dict[str, Any]:
    row = await store.pool.fetchrow(
        "SELECT verdict, signals, report, octet_length(report::text) AS report_bytes "
        "FROM scan_results WHERE job_id = $1", job_id)
    assert row is not None, f"no result for {job_id}"
    return {**dict(row), "names": {s["name"] for s in row["signals"]}}


async def artifacts(store: Store, job_id: uuid.UUID) -> dict[str, dict[str, Any]]:
    rows = await store.pool.fetch(
        "SELECT kind, content_type, size, sha256, data FROM scan_artifacts WHERE job_id = $1",
        job_id)
    return {r["kind"]: dict(r) for r in rows}


async def analyzing_detail(store: Store, job_id: uuid.UUID) -> dict[str, Any]:
    detail: dict[str, Any] = await store.pool.fetchval(
        "SELECT detail FROM scan_audit_log WHERE job_id = $1 AND to_state = 'ANALYZING'",
        job_id)
    return detail


async def test_render_job_sees_the_script_built_login_static_does_not_and_keeps_artifacts(
        make_settings: Any, store: Store, rds: redis.Redis, rendernet: RenderNet,  # noqa: F811
        tmp_path: Path) -> None:
    settings = render_settings(make_settings, rendernet)
    async with running_worker(settings):
        rendered = await submit(store, rds, settings, LOGIN, "render")
        static = await submit(store, rds, settings, LOGIN)  # SCAN_MODE: static
        for job_id in (rendered, static):
            row = await wait_terminal(store, job_id, timeout=JOB_S)
            assert row["state"] == "COMPLETED", row
    seen, plain = await result(store, rendered), await result(store, static)
    # The browser saw the login form that posts elsewhere; the static fetch saw an empty page.
    assert {"script_built_form", "password_form_cross_domain"} <= seen["names"], seen["names"]
    assert seen["verdict"] == "malicious"
    assert plain["verdict"] == "safe" and "script_built_form" not in plain["names"]
    assert plain["report"]["render"] is None
    detail = await analyzing_detail(store, rendered)
    assert (detail["mode"], detail["static_verdict"]) == ("render", "safe")

    # The artifacts are stored apart; the result row keeps none of their bytes.
    arts = await artifacts(store, rendered)
    assert {"screenshot", "dom", "requests"} <= set(arts), set(arts)
    shot = arts["screenshot"]
    image = Image.open(io.BytesIO(shot["data"]))
    image.load()
    assert shot["content_type"] == "image/png" and image.size == (1280, 720)
    assert max(ImageStat.Stat(image.convert("RGB")).stddev) > 20  # not blank
    assert shot["size"] == len(shot["data"])
    assert b'type="password"' in arts["dom"]["data"]
    requests = orjson.loads(arts["requests"]["data"])
    assert requests[0]["url"] == LOGIN and requests[0]["navigation"]
    render = seen["report"]["render"]
    assert render["screenshot"]["base64"] is None and render["dom"] is None
    assert set(render["stored_apart"]) == set(arts)
    assert seen["report_bytes"] < 64 * 1024, seen["report_bytes"]
    assert await artifacts(store, static) == {}

    # `status JOB --screenshot FILE` lists them and writes the image.
    out_file = tmp_path / "shot.png"
    proc = await asyncio.create_subprocess_exec(
        CLI, "status", str(rendered), "--screenshot", str(out_file),
        env=env_of(settings, "cli"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    listed = {a["kind"] for a in orjson.loads(stdout)["artifacts"]}
    assert listed == set(arts) and out_file.read_bytes() == shot["data"]
    # Every container of both jobs is gone.
    assert labelled_containers(rendered, 15) == [] and labelled_containers(static, 15) == []


async def test_render_on_suspicious_escalates_and_a_refused_sub_request_is_evidence(
        make_settings: Any, store: Store, rds: redis.Redis,
        rendernet: RenderNet) -> None:  # noqa: F811
    settings = render_settings(make_settings, rendernet, render_on="suspicious")
    async with running_worker(settings):
        hop = await submit(store, rds, settings, HOP)
        clean = await submit(store, rds, settings, LOGIN)
        image = await submit(store, rds, settings, IMAGE, "render")
        for job_id in (hop, clean, image):
            row = await wait_terminal(store, job_id, timeout=JOB_S)
            assert row["state"] == "COMPLETED", row
    # A static scan that was not clean (a meta refresh to another site) was rendered too.
    escalated = await result(store, hop)
    assert escalated["report"]["render"] is not None
    assert [h["kind"] for h in escalated["report"]["render"]["navigation"]] == ["http", "meta"]
    assert escalated["verdict"] == "suspicious"
    detail = await analyzing_detail(store, hop)
    assert (detail["mode"], detail["static_verdict"]) == ("render", "suspicious")
    assert "screenshot" in await artifacts(store, hop)
    # A clean one was not.
    assert (await result(store, clean))["report"]["render"] is None
    assert await artifacts(store, clean) == {}
    # The image from the refused address: refused, recorded, evidence - and never sent.
    probed = await result(store, image)
    assert "refused_subrequest" in probed["names"] and probed["verdict"] == "suspicious"
    lines = docker("logs", rendernet.refused_host).splitlines()
    assert all(line == "CONNECT-FROM 127.0.0.1" for line in lines), lines
    for job_id in (hop, clean, image):
        assert labelled_containers(job_id, 15) == []
