"""The render report: the fetcher's report (same top-level fields, same bounds) plus `render`.

The top-level part describes the main document as the fetcher's would (final response, its
headers and body hash, the features - here of the DOM after scripts ran), fitted to
FETCH_MAX_OUTPUT_BYTES by `reportfit`. `render` adds what only a browser sees; its lists are
bounded in count and in bytes, and the big artifacts (viewport screenshot, DOM, full-page
screenshot, in that order) are included only while the whole report stays under
RENDER_MAX_OUTPUT_BYTES. What was left out is counted in `render.truncated`.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import struct
import time
from typing import Any

from ..fetcher import fetch, htmlscan, netcheck, reportfit
from .browse import NAV_KINDS, Capture, RenderConfig
from .proxy import EgressProxy

RENDER_VERSION = "render-0.1.0"
MAX_LIST_URL = 2048  # URLs inside render lists (the top-level part keeps 8192)
# Shares of a quarter of the output cap for the render lists (the rest is for artifacts).
_LIST_SHARES = {"navigation": 0.10, "requests": 0.45, "refused": 0.10, "websockets": 0.05,
                "console": 0.10, "page_errors": 0.05, "cookies": 0.10, "downloads": 0.05}
_HTTP_ERRORS = (("ERR_CERT", "TLS_ERROR"), ("ERR_SSL", "TLS_ERROR"),
                ("ERR_TIMED_OUT", "CONNECT_TIMEOUT"), ("ERR_TUNNEL", "CONNECT_FAILED"),
                ("ERR_CONNECTION", "CONNECT_FAILED"), ("ERR_NAME", "DNS_FAILED"),
                ("ERR_TOO_MANY_REDIRECTS", "TOO_MANY_REDIRECTS"))


def navigation_chain(cap: Capture) -> list[dict[str, Any]]:
    """Main-frame navigations as hops {url, location, status, kind}: `http` for a header
    redirect, else Chromium's reason (`meta`, `script`, `form`, `link`, ...)."""
    navs = [r for r in cap.requests if r["navigation"]]
    hops: list[dict[str, Any]] = []
    for prev, nxt in itertools.pairwise(navs):
        if nxt["redirected_from"]:
            kind, status = "http", prev["status"]
        else:
            kind = NAV_KINDS.get(cap.nav_reasons.get(nxt["url"], ""), "other")
            status = None
        hops.append({"url": prev["url"], "location": nxt["url"], "status": status,
                     "kind": kind, "at_ms": nxt["start_ms"]})
    return hops


def main_error(cap: Capture, proxy: EgressProxy) -> tuple[str, str] | None:
    """Why the main document could not be shown, in the fetcher's error codes."""
    navs = [r for r in cap.requests if r["navigation"]]
    last = navs[-1] if navs else None
    if last is not None:
        refusal = proxy.refusal_for(last["url"])
        if refusal is not None:
            return refusal.code if refusal.code != "PAGE_TOO_BIG" else "READ_TIMEOUT", \
                f"{last['url'][:512]}: {refusal.reason}"
    if cap.main_failure is not None and (last is None or cap.main_failure[0] == last["url"]):
        text = cap.main_failure[1]
        code = next((c for marker, c in _HTTP_ERRORS if marker in text), "PROTOCOL_ERROR")
        return code, f"{cap.main_failure[0][:512]}: {text}"
    return cap.error


def base_report(cap: Capture, proxy: EgressProxy, cfg: RenderConfig,
                page: htmlscan.PageFeatures | None) -> dict[str, Any]:
    """The fetcher's report fields, describing the main document the browser ended on."""
    resp = cap.main_response
    hops = navigation_chain(cap)
    status = resp.status if resp is not None else None
    ctype = next((v for k, v in cap.main_headers if k.lower() == "content-type"), None)
    headers: dict[str, str] = {}
    for name, value in cap.main_headers:
        key = name.lower()[:128]
        if key in headers:
            headers[key] = f"{headers[key]}, {value}"[:fetch.MAX_HEADER_VALUE]
        elif len(headers) < fetch.MAX_HEADERS:
            headers[key] = value[:fetch.MAX_HEADER_VALUE]
    body = cap.main_body[: cfg.fetch.max_bytes]
    connected = None
    tls = None
    if resp is not None:
        try:
            parsed = netcheck.parse_url(resp.url)
            connected = proxy.address_of(parsed.host, parsed.port)
        except netcheck.UrlError:
            parsed = None
        if parsed is not None and parsed.scheme == "https":
            protocol = (cap.security or {}).get("protocol")
            tls = {"verified": True, "version": str(protocol)[:32] if protocol else None,
                   "error": None}
    error = main_error(cap, proxy)
    # Chromium's own error page (a refused or failed navigation) is no URL the page went to.
    final = cap.final_url if cap.final_url and cap.final_url.startswith(("http://", "https://")) \
        else None
    report: dict[str, Any] = {
        "schema_version": 1, "fetcher_version": RENDER_VERSION,
        "requested_url": cap.requested_url[:netcheck.MAX_URL],
        "final_url": final[:netcheck.MAX_URL] if final else None,
        "redirects": [{k: h[k] for k in ("url", "status", "location", "kind")}
                      for h in hops if h["kind"] in ("http", "meta")][:fetch.MAX_REDIRECT_HOPS],
        "http_status": status if status and 100 <= status <= 599 else None,
        "headers": headers, "content_type": ctype[:256] if ctype else None,
        "body_size": len(body), "body_truncated": len(cap.main_body) > len(body),
        "sha256": hashlib.sha256(body).hexdigest() if resp is not None else None,
        "title": cap.title, "resolved_addresses": [a[:64] for a in proxy.addresses()[:32]],
        "connected_address": connected, "tls": tls,
        "features": page.features() if page else htmlscan.empty_features(),
        "timings": {"dns_ms": _ms(proxy.dns_ms), "connect_ms": _ms(proxy.connect_ms),
                    "total_ms": round((time.monotonic() - cap.started) * 1000, 3)},
        "error": {"code": error[0], "message": error[1][:2048]} if error else None,
        "truncated": dict(page.dropped) if page else {},
    }
    fitted: dict[str, Any] = reportfit.fit(fetch.clean(report), cfg.fetch.max_output)
    return fitted


def build(cap: Capture, proxy: EgressProxy, cfg: RenderConfig) -> dict[str, Any]:
    """The whole report, within cfg.max_output bytes as printed."""
    page = None
    if cap.dom and cap.final_url and cap.final_url.startswith(("http://", "https://")):
        page = htmlscan.scan_html(cap.dom, cap.final_url)
    report = base_report(cap, proxy, cfg, page)
    for entry in cap.requests:
        refusal = proxy.refusal_for(entry["url"])
        if refusal is not None:
            entry["refused"] = refusal.reason[:1024]
        entry["initiator"] = cap.initiators.get(entry["url"])
        if entry["remote_address"] is None and not entry["refused"]:
            entry["remote_address"] = _address(proxy, entry["url"])
    for ws in cap.websockets:
        refusal = proxy.refusal_for(ws["url"])
        ws["refused"] = refusal.reason[:1024] if refusal is not None else None
    truncated: dict[str, int] = dict(cap.dropped)
    if cap.requests_dropped:
        truncated["render.requests"] = cap.requests_dropped
    if proxy.dropped:
        truncated["render.refused"] = proxy.dropped
    render: dict[str, Any] = {
        "browser": cap.browser_version,
        "phases": cap.phases,
        "navigation": navigation_chain(cap),
        "requests": cap.requests, "refused": [r.as_dict() for r in proxy.refused],
        "websockets": cap.websockets, "console": cap.console, "page_errors": cap.page_errors,
        "cookies": cap.cookies, "downloads": cap.downloads,
        "certificate": cap.certificate or _security(cap.security),
        "favicon": cap.favicon,
        "proxy": {"connections": len(proxy.exchanges), "bytes_in": proxy.total_in,
                  "targets": [{"target": e.target[:MAX_LIST_URL], "address": e.address,
                               "bytes_in": e.bytes_in} for e in proxy.exchanges[:100]]},
        "screenshot": None, "full_page": None, "screenshot_problem": cap.screenshot_problem,
        "dom": None, "dom_size": 0, "dom_sha256": None, "dom_truncated": False,
    }
    render = fetch.clean(render)
    lists_budget = cfg.max_output // 4
    for name, share in _LIST_SHARES.items():
        kept, dropped = _fit_list(render[name], int(lists_budget * share))
        render[name] = kept
        if dropped:
            truncated[f"render.{name}"] = truncated.get(f"render.{name}", 0) + dropped
    render["truncated"] = truncated
    report["render"] = render
    _add_artifacts(report, cap, cfg)
    return report


def _add_artifacts(report: dict[str, Any], cap: Capture, cfg: RenderConfig) -> None:
    """Viewport screenshot, then DOM, then full page: each only while the report fits."""
    render = report["render"]
    margin = 256

    def left() -> int:
        return cfg.max_output - 1 - reportfit.encoded_size(report) - margin

    def fit_image(key: str, data: bytes | None, kind: str) -> None:
        # A screenshot goes in whole or not at all (a cut image is no image): counted if not.
        if data is None:
            return
        shot = _image(data, kind)
        if reportfit.encoded_size(shot) <= left():
            render[key] = shot
        else:
            render["truncated"][f"render.{key}"] = 1

    fit_image("screenshot", cap.screenshot, cap.screenshot_type)
    if cap.dom is not None:
        data = cap.dom.encode("utf-8", "replace")
        render["dom_size"], render["dom_sha256"] = len(data), hashlib.sha256(data).hexdigest()
        budget = min(cfg.max_dom_bytes, max(0, left() - 16))
        dom = reportfit.cut_to_bytes(fetch.clean(cap.dom), budget)
        render["dom"], render["dom_truncated"] = dom, len(dom) < len(cap.dom)
    fit_image("full_page", cap.full_page, cap.full_page_type)


def _image(data: bytes, kind: str) -> dict[str, Any]:
    width, height = image_size(data)
    return {"type": f"image/{kind}", "width": width, "height": height, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "base64": base64.b64encode(data).decode("ascii")}


def image_size(data: bytes) -> tuple[int | None, int | None]:
    """Width and height from a PNG's IHDR or a JPEG's SOF marker (no imaging library)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    pos = 2
    while data[:2] == b"\xff\xd8" and pos + 9 < len(data):
        marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return int(width), int(height)
        pos += 2 + int(length)
    return None, None


def _fit_list(items: list[Any], budget: int) -> tuple[list[Any], int]:
    kept: list[Any] = []
    used = 0
    for item in items:
        item = _short_urls(item)
        size = reportfit.encoded_size(item) + 1
        if used + size > budget:
            return kept, len(items) - len(kept)
        kept.append(item)
        used += size
    return kept, 0


def _short_urls(item: Any) -> Any:
    if isinstance(item, dict):
        return {k: (v[:MAX_LIST_URL] if isinstance(v, str) and k in ("url", "location",
                                                                    "redirected_from")
                    else _short_urls(v)) for k, v in item.items()}
    return item


def _address(proxy: EgressProxy, url: str) -> str | None:
    try:
        parsed = netcheck.parse_url(url)
    except netcheck.UrlError:
        return None
    return proxy.address_of(parsed.host, parsed.port)


def _security(details: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chromium's view of the certificate, when our own handshake could not get it."""
    if not details:
        return None
    valid_from = details.get("validFrom")
    return {"subject": str(details.get("subjectName", ""))[:1024],
            "issuer": str(details.get("issuer", ""))[:1024], "sans": [],
            "not_before": valid_from, "not_after": details.get("validTo"),
            "age_days": (round((time.time() - float(valid_from)) / 86400, 1)
                         if isinstance(valid_from, int | float) else None),
            "serial": None, "version": details.get("protocol")}


def _ms(value: float) -> float | None:
    return round(value, 3) if value else None
