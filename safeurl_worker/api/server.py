"""`safeurl-worker api`: uvicorn serving the app, and the callback deliverer beside it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from ..callbacks import Deliverer
from ..config import Settings
from .app import create_app, services
from .config import ApiSettings

log = logging.getLogger("safeurl.api")


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM after its graceful shutdown, which would end the
    process by the signal (status -15) before our own clean-up. We install our own handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _stop(self, sig: int) -> None:
        log.info("signal received: stopping", extra={"signal": sig})
        if self.should_exit:  # a second signal: do not wait for open connections
            self.force_exit = True
        self.should_exit = True


async def run_api(settings: Settings, api: ApiSettings) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn's handlers); then stop the deliverer. A delivery
    cut short is retried after its lease: callbacks are at least once."""
    stopping = asyncio.Event()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per callback is ours
    async with services(settings, api) as svc:
        server = _Server(uvicorn.Config(
            create_app(svc), host=api.api_host, port=api.api_port, log_config=None,
            access_log=False, lifespan="off", proxy_headers=False, server_header=False))
        deliverer = None
        if api.callback_secret:
            deliverer = Deliverer(
                svc.store, secret=api.callback_secret, ports=api.ports, allow=api.allow,
                timeout_s=api.callback_timeout_s, max_attempts=api.callback_max_attempts,
                backoff_base_s=api.callback_backoff_base_s,
                backoff_cap_s=api.callback_backoff_cap_s)
        else:
            log.warning("CALLBACK_SECRET is not set: completion callbacks are off")
        if not api.api_session_secret:
            log.warning("API_SESSION_SECRET is not set: console sessions are valid on this "
                        "process only, until it restarts")
        task = asyncio.create_task(deliverer.run(stopping)) if deliverer else None
        log.info("api listening", extra={"host": api.api_host, "port": api.api_port,
                                         "tokens": len(svc.tokens)})
        try:
            await server.serve()
        finally:
            stopping.set()
            if task is not None and deliverer is not None:
                with contextlib.suppress(Exception):
                    # A round's attempts end within two timeouts (address check, request).
                    await asyncio.wait_for(task, 2 * api.callback_timeout_s + 5)
                await deliverer.close()
