"""One render scan: check the URL, start the proxy, render, build the report. Never raises for
anything the target does; a bug becomes INTERNAL_ERROR."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from typing import Any

from ..fetcher import netcheck
from . import report
from .browse import Capture, RenderConfig, Renderer
from .proxy import EgressProxy, ProxyConfig

# Past the fetch deadline: time to close the browser and print what was gathered.
GRACE_S = 4.0


def error_report(url: str, code: str, message: str,
                 cfg: RenderConfig | None = None) -> dict[str, Any]:
    """A report for a render that could not start (bad URL, refused target, bad settings)."""
    cfg = cfg or RenderConfig()
    cap = Capture(url)
    cap.error = (code, message)
    return report.build(cap, EgressProxy(_proxy_config(cfg)), cfg)


def _proxy_config(cfg: RenderConfig) -> ProxyConfig:
    return ProxyConfig(cfg.fetch.allowed_ports, cfg.fetch.allow_cidrs,
                       connect_timeout_s=min(10.0, cfg.fetch.timeout_s),
                       dns_timeout_s=min(5.0, cfg.fetch.timeout_s),
                       max_total_bytes=cfg.max_page_bytes)


async def scan(url: str, cfg: RenderConfig,
               resolver: netcheck.Resolver | None = None) -> dict[str, Any]:
    proxy = EgressProxy(_proxy_config(cfg), resolver or netcheck.system_resolver)
    # The submitted URL first, as the fetcher checks it: a refused target never starts a browser.
    check = await proxy.check(url)
    if not check.ok:
        return error_report(url, check.code or netcheck.BLOCKED_TARGET, check.reason, cfg)
    await proxy.start()
    renderer = Renderer(url, cfg, proxy)
    try:
        await asyncio.wait_for(renderer.run(), cfg.fetch.timeout_s + GRACE_S)
    except TimeoutError:
        renderer.cap.error = renderer.cap.error or ("READ_TIMEOUT", "hard deadline reached")
    except Exception as exc:
        print(f"render: internal error: {exc!r}", file=sys.stderr)
        renderer.cap.error = ("INTERNAL_ERROR", f"{type(exc).__name__}: {exc}"[:2048])
    finally:
        await proxy.close()
    return report.build(renderer.cap, proxy, cfg)


def run(url: str, env: Mapping[str, str]) -> dict[str, Any]:
    """Render `url` with FETCH_*/RENDER_* settings from `env`; always returns a report."""
    try:
        cfg = RenderConfig.from_env(env)
    except ValueError as exc:
        return error_report(url, "INTERNAL_ERROR", str(exc))
    return asyncio.run(scan(url, cfg))

