"""The web console in a real headless browser: Debian's chromium driven by Playwright, against the
app served by uvicorn on 127.0.0.1, a real worker, PostgreSQL and Redis. Screenshots of the main
pages go to SAFEURL_SCREENSHOT_DIR (docs/img/console/ for the README) or the test's tmp dir."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.async_api import Page, async_playwright, expect

from safeurl_worker import ops
from safeurl_worker.api.app import create_app, services, session_key
from safeurl_worker.api.config import parse_tokens
from safeurl_worker.api.console import (
    COOKIE,
    SESSION_S,
    _safe_next,
    csrf_for,
    session_token,
    session_value,
)
from safeurl_worker.config import Settings
from safeurl_worker.consumer import Consumer
from safeurl_worker.models import State
from safeurl_worker.store import Store, Submission

from .conftest import TestNet, running_worker
from .helpers import wait_terminal
from .test_api import PNG, TOKEN_SPEC, TOKENS, _with_render_artifacts, api_settings
from .test_api import _complete as complete_job
from .test_callbacks import free_port

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
async def served(make_settings: type[Settings]) -> AsyncIterator[tuple[str, Settings]]:
    """The app on a real port, as `safeurl-worker api` serves it."""
    settings = make_settings(unknown_job_retries=1)
    async with services(settings, api_settings()) as svc:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=port,
                                               log_config=None, lifespan="off"))
        task = asyncio.create_task(server.serve())
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}", settings
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)


def shots(tmp_path: Path) -> Path:
    where = Path(os.environ.get("SAFEURL_SCREENSHOT_DIR") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


async def login(page: Page, base: str, token: str) -> None:
    await page.goto(f"{base}/")
    await expect(page).to_have_url(f"{base}/login?next=/")
    await page.fill("#token", token)
    await page.click("button[type=submit]")


async def test_log_in_see_a_scan_and_replay_a_dead_letter(
        served: tuple[str, Settings], store: Store, testnet: TestNet, tmp_path: Path) -> None:
    base, settings = served
    out = shots(tmp_path)
    async with running_worker(settings) as worker, async_playwright() as pw:
        consumer = worker.consumer
        done = await ops.submit_scan(store, consumer, Submission(
            uuid.uuid4(), "http://site-a.test/"))
        login_page = await ops.submit_scan(store, consumer, Submission(
            uuid.uuid4(), "http://site-b.test/login"))
        for job in (done, login_page):
            assert (await wait_terminal(store, job.id, 60))["state"] == "COMPLETED"
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 860})
            # Log in: a wrong token is refused on the page, the right one gets in.
            await login(page, base, "not-a-token")
            await expect(page.locator("[role=alert]")).to_have_text("unknown token")
            await page.screenshot(path=str(out / "console-login.png"))
            await page.fill("#token", TOKENS["operate"])
            await page.click("button[type=submit]")
            await expect(page).to_have_url(f"{base}/")
            await expect(page.locator(".who")).to_have_text("operate")
            cookies = await page.context.cookies()
            assert all(TOKENS["operate"] not in c["value"] for c in cookies)
            assert TOKENS["operate"] not in await page.content()
            await expect(page.locator("#scans tbody tr")).to_have_count(2)
            await expect(page.locator("#fleet")).to_contain_text("COMPLETED")
            await page.screenshot(path=str(out / "console-fleet.png"), full_page=True)

            # A completed scan's page: verdict and the audit trail as a timeline.
            await page.click(f"a[href='/scans/{done.id}']")
            await expect(page.locator("#state")).to_have_text("COMPLETED")
            assert (await page.locator("#verdict").text_content() or "").strip() == "safe"
            await expect(page.locator("#audit li")).to_have_count(3)
            await expect(page.locator("#audit li").nth(2)).to_contain_text(
                "ANALYZING → COMPLETED")
            await page.screenshot(path=str(out / "console-scan.png"), full_page=True)
            # A page with signals: each with its evidence.
            await page.goto(f"{base}/scans/{login_page.id}")
            await expect(page.locator("#state")).to_have_text("COMPLETED")
            signals = await store.pool.fetchval(
                "SELECT signals FROM scan_results WHERE job_id = $1", login_page.id)
            await expect(page.locator("#signals tbody tr")).to_have_count(len(signals))
            for sig in signals:
                await expect(page.locator("#signals")).to_contain_text(sig["evidence"][:40])
            await page.screenshot(path=str(out / "console-scan-signals.png"), full_page=True)

            # A dead letter: a message whose job row arrives too late.
            ghost = uuid.uuid4()
            await consumer.enqueue(ghost)
            entry = await _dead_letter_of(consumer, ghost)
            await store.insert_job("http://site-a.test/", job_id=ghost)
            await page.click("text=Dead letters")
            await expect(page.locator("#dead-letters")).to_contain_text(str(ghost))
            await page.screenshot(path=str(out / "console-dead-letters.png"), full_page=True)
            # Replay it and watch it complete (the page refreshes itself while it runs).
            await page.click(f"button[data-entry='{entry}']")
            await expect(page).to_have_url(f"{base}/scans/{ghost}")
            await expect(page.locator("#state")).to_have_text("COMPLETED", timeout=60_000)
            await expect(page.locator("#audit li")).to_have_count(3)  # its first and only run
            await page.screenshot(path=str(out / "console-replayed.png"), full_page=True)
            assert await ops.dlq_list(consumer, 10) == []

            # A forged form (no valid CSRF field) changes nothing, even with the cookie.
            forged = await page.request.post(f"{base}/dead-letters/replay",
                                             form={"entry": "1-0", "csrf": "x" * 64})
            assert forged.status == 403
            await page.click("text=Log out")
            await expect(page).to_have_url(f"{base}/login")
            await page.goto(f"{base}/dead-letters")
            await expect(page).to_have_url(f"{base}/login?next=/dead-letters")
        finally:
            await browser.close()


async def test_a_read_only_token_sees_no_buttons_and_cannot_post(
        served: tuple[str, Settings], store: Store) -> None:
    base = served[0]
    job_id = await store.insert_job("http://site-a.test/")
    job = await store.get_job(job_id)
    assert job is not None
    await store.transition(job, State.FAILED, worker_id="w", error_code="TIMEOUT")
    rendered = await store.insert_job("http://site-a.test/r")
    await complete_job(store, rendered)
    await _with_render_artifacts(store, rendered)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            await login(page, base, TOKENS["read"])
            await page.goto(f"{base}/scans/{job_id}")
            await expect(page.locator("#state")).to_have_text("FAILED")
            await expect(page.locator("#retry")).to_have_count(0)
            # Even with a valid CSRF field of its own session, the scope decides.
            csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
            r = await page.request.post(f"{base}/scans/{job_id}/retry", form={"csrf": csrf or ""})
            assert r.status == 403
            # A render scan's screenshot is shown (the page's CSP lets our own images in).
            await page.goto(f"{base}/scans/{rendered}")
            shot = page.locator("#screenshot")
            await expect(shot).to_have_count(1)
            await page.wait_for_function(
                "document.getElementById('screenshot').complete")
            assert await shot.evaluate("img => img.naturalWidth") == 1
            got = await page.request.get(f"{base}/scans/{rendered}/artifacts/screenshot")
            assert got.status == 200 and await got.body() == PNG
        finally:
            await browser.close()
    assert (await store.get_job(job_id)).state is State.FAILED  # type: ignore[union-attr]
    # Without a session the console redirects to the login page; the API says 401.
    async with httpx.AsyncClient(base_url=base) as client:
        r = await client.get("/", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/"
        assert (await client.get("/v1/status")).status_code == 401
        r = await client.get(f"/scans/{rendered}/artifacts/screenshot", follow_redirects=False)
        assert r.status_code == 303  # artifacts too need a session
        # Login CSRF: a login form posted without our cookie (from another site) is refused.
        r = await client.post("/login", data={"token": TOKENS["operate"], "csrf": "x" * 43})
        assert r.status_code == 403 and COOKIE not in r.cookies
        form = await client.get("/login")
        assert form.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in form.headers["content-security-policy"]
        found = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert found is not None
        r = await client.post("/login", data={"token": TOKENS["operate"],
                                              "csrf": found.group(1)})
        assert r.status_code == 303 and COOKIE in r.cookies


async def _dead_letter_of(consumer: Consumer, job_id: uuid.UUID) -> str:
    deadline = time.monotonic() + 30
    while True:
        for e in await ops.dlq_list(consumer, 100):
            if e.get("job_id") == str(job_id):
                return e["id"]
        assert time.monotonic() < deadline, "no dead letter"
        await asyncio.sleep(0.1)


def test_sessions_are_signed_expire_and_end_with_their_token() -> None:
    tokens = parse_tokens(TOKEN_SPEC)
    op = next(t for t in tokens if t.name == "operate")
    key = session_key(api_settings(api_session_secret="s" * 32))
    value = session_value(key, op, now=1000)
    assert session_token(key, tokens, value, now=1000 + 60) == op
    assert session_token(key, tokens, value, now=1000 + SESSION_S + 1) is None  # expired
    name, expires, mac = value.split(".")
    assert session_token(key, tokens, f"read.{expires}.{mac}", now=1000) is None  # other name
    assert session_token(key, tokens, f"{name}.{int(expires) + 9999}.{mac}", now=1000) is None
    others = [t for t in tokens if t.name != "operate"]
    assert session_token(key, others, value, now=1000) is None  # token removed: session ends
    assert TOKENS["operate"] not in value
    assert csrf_for(key, op, value) != csrf_for(key, op, session_value(key, op, now=2000))
    # Another replica with the same API_SESSION_SECRET accepts it; one with another does not.
    assert session_token(session_key(api_settings(api_session_secret="s" * 32)), tokens,
                         value, now=1000) == op
    assert session_token(session_key(api_settings()), tokens, value, now=1000) is None
    # API_TOKENS (the hashes) alone cannot forge a session: the old scheme, a MAC keyed by
    # the token's hash, is refused.
    forged_mac = hmac.new(bytes.fromhex(op.sha256), f"session|{name}|{expires}".encode(),
                          hashlib.sha256).hexdigest()
    assert session_token(key, tokens, f"{name}.{expires}.{forged_mac}", now=1000) is None


@pytest.mark.parametrize(("target", "want"), [
    ("/", "/"), ("/scans/1", "/scans/1"), ("//evil.example", "/"), ("/\\evil.example", "/"),
    ("https://evil.example/", "/"), ("javascript:alert(1)", "/")])
def test_login_redirects_only_to_our_own_paths(target: str, want: str) -> None:
    assert _safe_next(target) == want


async def test_the_fleet_page_shows_lanes_and_tenants_and_a_scan_its_lane(
        make_settings: type[Settings], store: Store) -> None:
    settings = make_settings()
    async with services(settings, api_settings()) as svc:
        for lane, tenant in (("bulk", "acme"), ("bulk", "acme"), (None, "zed"), (None, None)):
            await store.insert_job("http://site-a.test/", lane=lane, tenant=tenant)
        bulk = await store.pool.fetchval("SELECT id FROM scan_jobs WHERE lane = 'bulk' LIMIT 1")
        [reader] = [t for t in parse_tokens(TOKEN_SPEC) if t.name == "read"]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)),
                                     base_url="http://console.test",
                                     cookies={COOKIE: session_value(svc.session_key, reader)}
                                     ) as client:
            home = await client.get("/")
            assert home.status_code == 200, home.text
            text = re.sub(r"\s+", " ", home.text)
            # name, queued, running, the oldest queued job's wait so far, done in 5 minutes
            rows = dict(re.findall(r'<tr><td class="mono">([a-z]+)</td>((?:<td>[^<]*</td>)+)</tr>',
                                   text))

            def cells(name: str) -> list[str]:
                return re.findall(r"<td>([^<]*)</td>", rows[name])

            assert cells("bulk")[:2] == ["2", "0"] and cells("bulk")[3] == "0", text
            assert cells("default")[:2] == ["2", "0"] and cells("default")[2].endswith(" s")
            assert cells("interactive") == ["0", "0", "-", "0"]
            assert '<table id="tenants">' in text
            assert cells("acme")[:2] == ["2", "0"] and cells("zed")[:2] == ["1", "0"]
            scan = await client.get(f"/scans/{bulk}")
            assert scan.status_code == 200
            assert '<span id="lane">bulk</span>' in scan.text
            assert '<span id="tenant">acme</span>' in scan.text
