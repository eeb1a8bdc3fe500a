"""Render one URL in Chromium behind the egress proxy and gather what a browser saw.

Chromium (Debian's, `/usr/bin/chromium`, driven by Playwright through its executable path) runs
with `--proxy-server` set to the in-sandbox `proxy.EgressProxy` and host resolver rules that make
every name unresolvable to the browser itself, so every request - document, redirect hop,
sub-resource, WebSocket, favicon - is checked by the fetcher's address rules in the proxy.
The page gets its load event plus a quiet settle time, all within the fetch deadline; then the
DOM, screenshots, cookies and logs are read and the browser is closed. `report.build` turns the
result into the JSON report.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import mmh3
from playwright.async_api import (
    Browser,
    BrowserContext,
    CDPSession,
    ConsoleMessage,
    Download,
    FloatRect,
    Frame,
    Page,
    Request,
    Response,
    WebSocket,
    async_playwright,
)
from playwright.async_api import Error as PlaywrightError

from ..fetcher import fetch, htmlscan, netcheck, weburl
from .proxy import EgressProxy

# Debian's chromium binary itself, not its /usr/bin/chromium wrapper script: the wrapper sources
# /etc/chromium.d, which exports Debian's Google API keys (enabling calls to Google services) and
# adds --enable-remote-extensions; the image deletes those files too.
CHROMIUM = "/usr/lib/chromium/chromium"
MAX_REQUESTS = 500
MAX_NAVIGATIONS = 20
MAX_CONSOLE = 100
MAX_ERRORS = 50
MAX_COOKIES = 100
MAX_DOWNLOADS = 10
MAX_WEBSOCKETS = 50
MAX_TEXT = 1024
MAX_FAVICON = 256 * 1024
# Where Chromium's own Google services are pointed: a closed port on the container's loopback,
# reached directly (not through the proxy, so it is not recorded as the page's), never answered.
DEAD_END = "127.0.0.1:9"
MAX_SCHEDULED_S = 10.0  # a refresh scheduled further out is not waited for (as the fetcher)
# Why a navigation happened, from Chromium's own `Page.frameRequestedNavigation` reasons.
NAV_KINDS = {"metaTagRefresh": "meta", "httpHeaderRefresh": "meta", "scriptInitiated": "script",
             "formSubmissionGet": "form", "formSubmissionPost": "form", "anchorClick": "link",
             "reload": "reload"}
DISABLED_FEATURES = (
    # Playwright 1.65's defaults
    "AvoidUnnecessaryBeforeUnloadCheckSync", "DestroyProfileOnBrowserClose", "HttpsUpgrades",
    "HttpsFirstBalancedModeAutoEnable", "LensOverlay", "MediaRouter", "PaintHolding",
    "ThirdPartyStoragePartitioning", "AvoidCorsURLLoaderRestartOnRedirect", "OptimizationHints",
    "NetworkTimeServiceQuerying", "AimEnabled", "PreconnectToSearch",
    # ours: no name resolution outside the proxy, no calls home
    "DnsOverHttps", "AsyncDns", "NetworkPrediction", "Translate", "AutofillServerCommunication",
    "CertificateTransparencyComponentUpdater", "InterestFeedContentSuggestions",
    "SafeBrowsingEnhancedProtection", "PrivacySandboxSettings4", "ChromeWhatsNewUI",
    "AccountConsistency", "SigninInterceptBubble",
)


@dataclass(frozen=True)
class RenderConfig:
    fetch: fetch.FetchConfig = field(default_factory=fetch.FetchConfig)
    settle_s: float = 1.5  # quiet time after load (and after each later navigation)
    viewport: tuple[int, int] = (1280, 720)
    max_page_height: int = 2048  # full-page screenshot height cap, CSS pixels (see docs)
    max_screenshot_bytes: int = 384 * 1024  # per image, before base64
    max_dom_bytes: int = 512 * 1024
    max_output: int = 4 * 1024 * 1024  # the whole report, as printed
    max_page_bytes: int = 64 * 1024 * 1024  # everything all requests may download
    executable: str = CHROMIUM

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RenderConfig:
        """FETCH_* as the fetcher reads them, plus RENDER_*; ValueError names the variable."""
        base = fetch.FetchConfig.from_env(env)

        def num(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            try:
                value = float(raw) if raw else default
            except ValueError:
                raise ValueError(f"invalid RENDER_* configuration: {name}={raw!r}") from None
            if not value > 0:
                raise ValueError(f"invalid RENDER_* configuration: {name} must be positive")
            return value

        return cls(fetch=base, settle_s=num("RENDER_SETTLE_MS", 1500) / 1000,
                   max_page_height=int(num("RENDER_MAX_PAGE_HEIGHT", 2048)),
                   max_screenshot_bytes=int(num("RENDER_MAX_SCREENSHOT_BYTES", 384 * 1024)),
                   max_dom_bytes=int(num("RENDER_MAX_DOM_BYTES", 512 * 1024)),
                   max_output=int(num("RENDER_MAX_OUTPUT_BYTES", 4 * 1024 * 1024)),
                   max_page_bytes=int(num("RENDER_MAX_PAGE_BYTES", 64 * 1024 * 1024)))


def chromium_args(proxy_port: int) -> list[str]:
    """Each flag is explained in docs/sandbox.md (browser sandbox)."""
    return [
        # Chromium's own sandbox needs user namespaces or a setuid helper, which the container
        # forbids (no capabilities, no-new-privileges, default seccomp); the container is the
        # sandbox.
        "--no-sandbox",
        f"--proxy-server=http://127.0.0.1:{proxy_port}",
        # Loopback is bypassed by default: send it to the proxy too, which refuses it - except
        # DEAD_END, a closed port of the container's own, where Chromium's own services go.
        f"--proxy-bypass-list=<-loopback>;{DEAD_END}",
        # The browser resolves nothing: every name goes to the proxy, which resolves and checks.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        # UDP would not pass the proxy: no QUIC, no WebRTC outside the proxy.
        "--disable-quic",
        "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
        "--webrtc-ip-handling-policy=disable_non_proxied_udp",
        # Playwright's own list (this switch replaces it) plus every feature that would call
        # Google's services or resolve names outside the proxy.
        "--disable-features=" + ",".join(DISABLED_FEATURES),
        "--dns-prefetch-disable",
        "--no-pings",
        "--disable-background-networking",
        "--disable-component-update",
        # Chromium 156 still asks update.googleapis.com for components despite the switch above,
        # and accounts.google.com for signed-in accounts: point both at the dead end.
        f"--component-updater=url-source=http://{DEAD_END}/",
        f"--gaia-url=http://{DEAD_END}", f"--google-apis-url=http://{DEAD_END}",
        f"--lso-url=http://{DEAD_END}",
        "--disable-sync",
        "--disable-domain-reliability",
        "--no-first-run",
        "--disable-gpu",
        "--mute-audio",
        # /dev/shm is small and private; Chromium's shared memory goes to /tmp (a tmpfs) instead.
        "--disable-dev-shm-usage",
        "--disk-cache-size=1048576",
        "--disable-client-side-phishing-detection",
        "--disable-default-apps",
        "--no-default-browser-check",
    ]


@dataclass
class Capture:
    """Everything gathered during one render (plain data, turned into the report later)."""

    requested_url: str
    started: float = field(default_factory=time.monotonic)
    requests: list[dict[str, Any]] = field(default_factory=list)
    requests_dropped: int = 0
    navigations: list[dict[str, Any]] = field(default_factory=list)
    console: list[dict[str, Any]] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    downloads: list[dict[str, Any]] = field(default_factory=list)
    websockets: list[dict[str, Any]] = field(default_factory=list)
    cookies: list[dict[str, Any]] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    main_response: Response | None = None
    main_body: bytes = b""
    main_headers: list[tuple[str, str]] = field(default_factory=list)
    browser_version: str | None = None
    main_failure: tuple[str, str] | None = None  # (url, Chromium's error text)
    final_url: str | None = None
    title: str | None = None
    dom: str | None = None
    screenshot: bytes | None = None
    screenshot_type: str = "png"
    full_page: bytes | None = None
    full_page_type: str = "png"
    screenshot_problem: str | None = None
    favicon: dict[str, Any] | None = None
    certificate: dict[str, Any] | None = None
    security: dict[str, Any] | None = None
    error: tuple[str, str] | None = None  # (code, message)
    initiators: dict[str, dict[str, Any]] = field(default_factory=dict)
    nav_reasons: dict[str, str] = field(default_factory=dict)
    last_activity: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)  # ms since start, at each phase end
    by_request: dict[Request, dict[str, Any]] = field(default_factory=dict)

    def ms(self) -> float:
        return round((time.monotonic() - self.started) * 1000, 1)

    def keep(self, name: str, items: list[Any], item: Any, limit: int) -> None:
        if len(items) < limit:
            items.append(item)
        else:
            self.dropped[name] = self.dropped.get(name, 0) + 1


class Renderer:
    def __init__(self, url: str, cfg: RenderConfig, proxy: EgressProxy) -> None:
        self.cfg = cfg
        self.proxy = proxy
        self.cap = Capture(url)
        self.deadline = time.monotonic() + cfg.fetch.timeout_s
        self.page: Page | None = None
        self._tasks: set[asyncio.Future[Any]] = set()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _ms_left(self, at_most: float) -> float:
        return max(100.0, min(at_most, self.remaining()) * 1000)

    async def run(self) -> Capture:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=self.cfg.executable, args=chromium_args(self.proxy.port),
                timeout=self._ms_left(15), handle_sigint=False, handle_sigterm=False)
            self.cap.browser_version = browser.version[:64]
            self.cap.phases["launched_ms"] = self.cap.ms()
            try:
                await self._render(browser)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(browser.close(), 5)
                self.cap.phases["closed_ms"] = self.cap.ms()
        return self.cap

    async def _render(self, browser: Browser) -> None:
        width, height = self.cfg.viewport
        context = await browser.new_context(
            viewport={"width": width, "height": height}, user_agent=self.cfg.fetch.user_agent,
            locale="en-US", accept_downloads=True, service_workers="block",
            ignore_https_errors=False)
        page = await context.new_page()
        self.page = page
        self._hook(page)
        await self._hook_cdp(context, page)
        await self._navigate(page)
        self.cap.phases["loaded_ms"] = self.cap.ms()
        await self._settle(page)
        self.cap.phases["settled_ms"] = self.cap.ms()
        await self._collect(context, page)
        self.cap.phases["collected_ms"] = self.cap.ms()

    # --- events ----------------------------------------------------------------------------

    def _hook(self, page: Page) -> None:
        page.on("request", self._on_request)
        page.on("response", self._on_response)
        page.on("requestfinished", self._on_finished)
        page.on("requestfailed", self._on_failed)
        page.on("framenavigated", self._on_navigated)
        page.on("console", self._on_console)
        page.on("pageerror", self._on_page_error)
        page.on("download", self._on_download)
        page.on("websocket", self._on_websocket)
        # Settling counts from each document's load event: a page's timers start about then.
        page.on("load", self._on_load)

    async def _hook_cdp(self, context: BrowserContext, page: Page) -> None:
        """Initiators and navigation reasons are only in Chromium's own protocol events."""
        session: CDPSession = await context.new_cdp_session(page)
        await session.send("Network.enable")
        await session.send("Page.enable")
        session.on("Network.requestWillBeSent", self._on_cdp_request)
        session.on("Page.frameRequestedNavigation", self._on_cdp_navigation)
        # A meta refresh is scheduled while the page loads: keep settling until it has fired.
        session.on("Page.frameScheduledNavigation", self._on_cdp_scheduled)

    def _on_cdp_request(self, params: dict[str, Any]) -> None:
        initiator = params.get("initiator") or {}
        url = str(params.get("request", {}).get("url", ""))
        where = initiator.get("url")
        frames = (initiator.get("stack") or {}).get("callFrames") or []
        if not where and frames:
            where = frames[0].get("url")
        if url and url not in self.cap.initiators and len(self.cap.initiators) < MAX_REQUESTS:
            self.cap.initiators[url] = {"type": str(initiator.get("type", ""))[:32],
                                        "url": str(where)[:netcheck.MAX_URL] if where else None}

    def _on_cdp_navigation(self, params: dict[str, Any]) -> None:
        url = str(params.get("url", ""))
        self.cap.last_activity = time.monotonic()
        if url and len(self.cap.nav_reasons) < MAX_NAVIGATIONS * 4:
            self.cap.nav_reasons.setdefault(url, str(params.get("reason", "")))

    def _on_cdp_scheduled(self, params: dict[str, Any]) -> None:
        delay = params.get("delay")
        if isinstance(delay, int | float) and delay <= MAX_SCHEDULED_S:
            self.cap.last_activity = max(self.cap.last_activity, time.monotonic() + delay)

    def _is_main(self, request: Request) -> bool:
        try:
            return (self.page is not None and request.is_navigation_request()
                    and request.frame == self.page.main_frame)
        except PlaywrightError:
            return False

    def _on_request(self, request: Request) -> None:
        if self._is_main(request):
            self.cap.last_activity = time.monotonic()
        if len(self.cap.requests) >= MAX_REQUESTS:
            self.cap.requests_dropped += 1
            return
        entry: dict[str, Any] = {
            "url": request.url[:netcheck.MAX_URL], "method": request.method[:16],
            "type": request.resource_type[:32], "navigation": self._is_main(request),
            "status": None, "remote_address": None, "size": None, "start_ms": self.cap.ms(),
            "duration_ms": None, "initiator": None, "error": None, "refused": None,
            "redirected_from": (request.redirected_from.url[:netcheck.MAX_URL]
                                if request.redirected_from else None)}
        self.cap.requests.append(entry)
        self.cap.by_request[request] = entry

    def _on_response(self, response: Response) -> None:
        entry = self.cap.by_request.get(response.request)
        if entry is not None:
            entry["status"] = response.status
        if self._is_main(response.request):
            self.cap.main_response = response

    async def _on_finished(self, request: Request) -> None:
        entry = self.cap.by_request.get(request)
        if entry is None:
            return
        timing = request.timing
        if timing.get("responseEnd", -1) >= 0:
            entry["duration_ms"] = round(timing["responseEnd"], 1)
        with contextlib.suppress(PlaywrightError):
            sizes = await request.sizes()
            entry["size"] = sizes["responseBodySize"] + sizes["responseHeadersSize"]

    def _on_failed(self, request: Request) -> None:
        failure = (request.failure or "failed")[:MAX_TEXT]
        entry = self.cap.by_request.get(request)
        if entry is not None:
            entry["error"] = failure
        if self._is_main(request):
            self.cap.main_failure = (request.url, failure)

    def _on_load(self, _page: Page) -> None:
        self.cap.last_activity = time.monotonic()

    def _on_navigated(self, frame: Frame) -> None:
        if self.page is None or frame != self.page.main_frame:
            return
        self.cap.last_activity = time.monotonic()
        self.cap.keep("render.navigation_events", self.cap.navigations,
                      {"url": frame.url[:netcheck.MAX_URL], "at_ms": self.cap.ms()},
                      MAX_NAVIGATIONS)

    def _on_console(self, message: ConsoleMessage) -> None:
        location = message.location or {}
        self.cap.keep("render.console", self.cap.console,
                      {"type": message.type[:16], "text": message.text[:MAX_TEXT],
                       "url": str(location.get("url", ""))[:MAX_TEXT] or None}, MAX_CONSOLE)

    def _on_page_error(self, error: Exception) -> None:
        self.cap.keep("render.page_errors", self.cap.page_errors, str(error)[:MAX_TEXT],
                      MAX_ERRORS)

    async def _on_download(self, download: Download) -> None:
        """Recorded with its hash; the file itself is deleted at once (never kept)."""
        item: dict[str, Any] = {"url": download.url[:netcheck.MAX_URL],
                                "filename": download.suggested_filename[:256],
                                "size": None, "sha256": None, "error": None}
        self.cap.keep("render.downloads", self.cap.downloads, item, MAX_DOWNLOADS)
        try:
            path = await asyncio.wait_for(download.path(), max(0.5, self.remaining() - 3))
            data = await asyncio.to_thread(path.read_bytes)
            item["size"], item["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        except (PlaywrightError, OSError, TimeoutError) as exc:
            item["error"] = str(exc)[:MAX_TEXT]
        finally:
            with contextlib.suppress(PlaywrightError):
                await download.delete()

    def _on_websocket(self, ws: WebSocket) -> None:
        item: dict[str, Any] = {"url": ws.url[:netcheck.MAX_URL], "error": None,
                                "frames_sent": 0, "frames_received": 0}
        self.cap.keep("render.websockets", self.cap.websockets, item, MAX_WEBSOCKETS)

        def count(key: str) -> None:
            item[key] = int(item[key]) + 1

        ws.on("framesent", lambda _payload: count("frames_sent"))
        ws.on("framereceived", lambda _payload: count("frames_received"))
        ws.on("socketerror", lambda error: item.update(error=str(error)[:MAX_TEXT]))

    # --- the visit ---------------------------------------------------------------------------

    async def _navigate(self, page: Page) -> None:
        try:
            await page.goto(self.cap.requested_url, wait_until="load",
                            timeout=self._ms_left(self.cfg.fetch.timeout_s))
        except PlaywrightError as exc:
            # A navigation that failed or timed out still leaves a page to read (or an error).
            if self.cap.main_failure is None and "Timeout" in type(exc).__name__:
                self.cap.error = ("READ_TIMEOUT", "the page did not finish loading in time")

    async def _settle(self, page: Page) -> None:
        """Wait until no main-frame navigation happened for `settle_s` (script and meta
        redirects land here), then for that page's load event; all within the deadline."""
        while self.remaining() > 1.0:
            quiet = time.monotonic() - self.cap.last_activity
            if quiet >= self.cfg.settle_s:
                break
            if len(self.cap.navigations) >= self.cfg.fetch.max_redirects + 1:
                self.cap.error = ("TOO_MANY_REDIRECTS",
                                  f"more than {self.cfg.fetch.max_redirects} redirects")
                break
            await asyncio.sleep(min(self.cfg.settle_s - quiet, self.remaining() - 1.0))
        with contextlib.suppress(PlaywrightError):
            await page.wait_for_load_state("load", timeout=self._ms_left(5))

    async def _collect(self, context: BrowserContext, page: Page) -> None:
        cap = self.cap
        cap.final_url = page.url
        with contextlib.suppress(PlaywrightError):
            cap.title = (await page.title())[:1024]
        with contextlib.suppress(PlaywrightError):
            cap.dom = await page.content()
        if cap.main_response is not None:
            with contextlib.suppress(PlaywrightError):
                cap.main_headers = [(h["name"], h["value"])
                                    for h in await cap.main_response.headers_array()]
            with contextlib.suppress(PlaywrightError):
                cap.main_body = await cap.main_response.body()
            with contextlib.suppress(PlaywrightError):
                details = await cap.main_response.security_details()
                cap.security = dict(details) if details else None
        await self._screenshots(page)
        with contextlib.suppress(PlaywrightError):
            for cookie in (await context.cookies())[:MAX_COOKIES]:
                cap.cookies.append(_cookie(dict(cookie)))
        await self._certificate()
        await self._favicon(context)

    async def _screenshots(self, page: Page) -> None:
        cap = self.cap
        try:
            cap.screenshot, cap.screenshot_type = await self._shot(page, None)
            height = await page.evaluate(
                "() => Math.max(document.documentElement ? document.documentElement"
                ".scrollHeight : 0, document.body ? document.body.scrollHeight : 0)")
            if isinstance(height, int | float) and height > self.cfg.viewport[1]:
                clip_h = min(int(height), self.cfg.max_page_height)
                cap.full_page, cap.full_page_type = await self._shot(page, clip_h)
        except PlaywrightError as exc:
            cap.screenshot_problem = str(exc)[:MAX_TEXT]

    async def _shot(self, page: Page, clip_h: int | None) -> tuple[bytes | None, str]:
        """PNG; a PNG over the cap is retaken as JPEG; a JPEG still over it is left out."""
        clip: FloatRect | None = None
        if clip_h:
            clip = {"x": 0, "y": 0, "width": self.cfg.viewport[0], "height": clip_h}
        timeout = self._ms_left(5)
        png = await page.screenshot(type="png", full_page=clip is not None, clip=clip,
                                    timeout=timeout, animations="disabled")
        if len(png) <= self.cfg.max_screenshot_bytes:
            return png, "png"
        jpeg = await page.screenshot(type="jpeg", quality=60, full_page=clip is not None,
                                     clip=clip, timeout=timeout)
        if len(jpeg) <= self.cfg.max_screenshot_bytes:
            return jpeg, "jpeg"
        self.cap.screenshot_problem = (f"a screenshot was over {self.cfg.max_screenshot_bytes} "
                                       "bytes and was left out")
        return None, "png"

    async def _certificate(self) -> None:
        url = self.cap.main_response.url if self.cap.main_response else None
        if not url or not url.startswith("https:"):
            return
        with contextlib.suppress(netcheck.UrlError):
            parsed = netcheck.parse_url(url)
            self.cap.certificate = await self.proxy.certificate(
                parsed.host, parsed.port, max(0.5, min(5.0, self.remaining())))

    async def _favicon(self, context: BrowserContext) -> None:
        """The page's icon (else /favicon.ico), loaded by the browser in a second tab - so it
        also goes through the proxy - and hashed as Shodan does: murmur3 of the base64."""
        if self.cap.final_url is None or self.remaining() < 1.5:
            return
        icons = _icon_links(self.cap.dom or "", self.cap.final_url)
        url = icons[0] if icons else _join(self.cap.final_url, "/favicon.ico")
        if url is None or not url.startswith(("http://", "https://")):
            return
        tab = await context.new_page()
        try:
            resp = await tab.goto(url, timeout=self._ms_left(3))
            if resp is None or not resp.ok:
                self.cap.favicon = {"url": url, "status": resp.status if resp else None,
                                    "mmh3": None, "sha256": None, "size": 0}
                return
            body = (await resp.body())[:MAX_FAVICON]
            self.cap.favicon = {"url": url[:netcheck.MAX_URL], "status": resp.status,
                                "mmh3": favicon_hash(body),
                                "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
        except PlaywrightError as exc:
            self.cap.favicon = {"url": url[:netcheck.MAX_URL], "status": None, "mmh3": None,
                                "sha256": None, "size": 0, "error": str(exc)[:MAX_TEXT]}
        finally:
            with contextlib.suppress(PlaywrightError):
                await tab.close()


def favicon_hash(data: bytes) -> int:
    """Shodan's `http.favicon.hash`: signed 32-bit murmur3 of the base64 with newlines every
    76 characters (`base64.encodebytes`), which Lookyloo and urlscan.io compute the same way."""
    return int(mmh3.hash(base64.encodebytes(data)))


def _cookie(raw: dict[str, Any]) -> dict[str, Any]:
    return {"name": str(raw.get("name", ""))[:256], "value": str(raw.get("value", ""))[:256],
            "domain": str(raw.get("domain", ""))[:256], "path": str(raw.get("path", ""))[:256],
            "expires": raw.get("expires"), "http_only": bool(raw.get("httpOnly")),
            "secure": bool(raw.get("secure")), "same_site": str(raw.get("sameSite", ""))[:16]}


def _join(base: str, ref: str) -> str | None:
    return weburl.join(base, ref)


def _icon_links(dom: str, base: str) -> list[str]:
    if not dom:
        return []
    return htmlscan.scan_html(dom[:256 * 1024], base, 1.0).icons
