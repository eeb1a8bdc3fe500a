"""Completion callbacks: deliver the outbox rows that terminal writes leave in `scan_callbacks`.

The row is written by the same statement as the job's terminal state (store.py), so a crash
never loses a callback. Here a `Deliverer` (run by `safeurl-worker api`; any number of replicas)
claims due rows with FOR UPDATE SKIP LOCKED, POSTs them, and records every attempt. Delivery is
at least once: a receiver must treat `X-SafeURL-Delivery` (the outbox row id) as the dedupe key.

A callback URL is user input, so it gets the scan's SSRF rules (fetcher/netcheck.py): resolve
once, check every address, and connect to a checked address only (never a second lookup that
DNS rebinding could answer differently), follow no redirect, read no answer body, and give each
step a deadline. A refused address ends the row REFUSED, never retried.

Signature (docs/api.md): `X-SafeURL-Signature: sha256=<hex>` where hex is
HMAC-SHA256(CALLBACK_SECRET, f"{X-SafeURL-Timestamp}.{raw body}").
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import httpx
import orjson

from .errors import cancelled_under_us, pause
from .fetcher import netcheck
from .store import Store

log = logging.getLogger("safeurl.callbacks")

EVENT = "scan.finished"
USER_AGENT = "SafeURL-Worker-Callback/1"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `X-SafeURL-Signature` value for `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, *,
           tolerance_s: float = 300, now: float | None = None) -> bool:
    """What a receiver does: recompute, compare in constant time, refuse stale timestamps."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((now if now is not None else time.time()) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def payload(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON body for one outbox row (claimed with its job and result columns)."""
    body: dict[str, Any] = {
        "event": EVENT, "delivery_id": row["id"], "id": str(row["job_id"]),
        "url": row["scan_url"], "state": row["state"], "version": row["version"],
        "error_code": row["error_code"], "finished_at": row["created_at"].isoformat(),
        "metadata": row["metadata"], "mode": row["mode"], "result": None,
    }
    if row["state"] == "COMPLETED" and row["verdict"] is not None:
        body["result"] = {"verdict": row["verdict"], "score": row["score"],
                          "final_url": row["final_url"]}
    return body


def backoff_s(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter's upper half: base * 2^(attempt-1), capped."""
    delay: float = min(cap, base * 2 ** (attempt - 1))
    return delay * random.uniform(0.5, 1.0)


class Refused(Exception):
    """The callback URL is not one we may call (SSRF rules): never retried."""


def check_callback_url(url: str, ports: Sequence[int], allow: Sequence[netcheck.IPNetwork],
                       resolver: netcheck.Resolver = netcheck.system_resolver
                       ) -> netcheck.CheckResult:
    """The scan's address rules for a callback URL. `resolver` does the only network I/O."""
    return netcheck.check_url(url, allowed_ports=ports, allow_cidrs=allow, resolver=resolver)


class Deliverer:
    def __init__(self, store: Store, *, secret: str, ports: Sequence[int],
                 allow: Sequence[netcheck.IPNetwork], timeout_s: float = 10,
                 max_attempts: int = 12, backoff_base_s: float = 2, backoff_cap_s: float = 3600,
                 batch: int = 20, idle_s: float = 1.0,
                 resolver: netcheck.Resolver = netcheck.system_resolver) -> None:
        self.store = store
        self.secret = secret
        self.ports = list(ports)
        self.allow = list(allow)
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.batch = batch
        self.idle_s = idle_s
        self.resolver = resolver
        # No environment proxies, no redirects: the checked address is the one we talk to. No
        # kept-alive connections either: the pool is keyed by address, so a connection made
        # (and its certificate verified) for one callback host would carry another host's
        # callback to the same address.
        self.client = httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                        timeout=timeout_s,
                                        limits=httpx.Limits(max_keepalive_connections=0))

    async def close(self) -> None:
        await self.client.aclose()

    async def run(self, stopping: asyncio.Event) -> None:
        """Deliver until `stopping` is set; a failing round (database down) waits and retries."""
        while not stopping.is_set():
            try:
                n = await self.run_once()
            except Exception as exc:
                cancelled_under_us()  # a cancel a client library turned into an error
                log.warning("callback round failed", extra={"error": f"{type(exc).__name__}: "
                                                                    f"{exc}"[:300]})
                n = 0
            if n == 0:
                await pause(stopping, self.idle_s)

    async def run_once(self) -> int:
        """Claim the due rows and deliver them concurrently. Returns how many were tried."""
        # The lease outlasts an attempt (address check and request: a timeout each) by a wide
        # margin, so a live deliverer's row never becomes due again under it.
        rows = await self.store.claim_callbacks(self.batch, lease_s=self.timeout_s * 3 + 30)
        await asyncio.gather(*(self.deliver(r) for r in rows))
        return len(rows)

    async def deliver(self, row: dict[str, Any]) -> str:
        """One attempt for one claimed row; records it and returns the row's new status."""
        started = time.monotonic()
        status, http_status, error = "PENDING", None, None
        try:
            http_status = await self._post(row)
            if 200 <= http_status < 300:
                status = "DELIVERED"
            else:
                error = f"HTTP {http_status}"
        except Refused as exc:
            status, error = "REFUSED", str(exc)[:1000]
        except TimeoutError:
            error = f"no answer within {self.timeout_s:g} s"
        except Exception as exc:  # network, TLS, a URL httpx refuses...: retried, recorded
            error = f"{type(exc).__name__}: {exc}"[:1000]
        attempt = int(row["attempts"])
        if status == "PENDING" and attempt >= self.max_attempts:
            status = "FAILED"
        retry_in = backoff_s(attempt, self.backoff_base_s, self.backoff_cap_s)
        await self.store.finish_callback(
            row["id"], attempt, status=status, retry_in_s=retry_in, http_status=http_status,
            error=error, duration_ms=int((time.monotonic() - started) * 1000))
        log.info("callback attempt", extra={"job_id": str(row["job_id"]), "callback": row["id"],
                                            "attempt": attempt, "status": status,
                                            "http_status": http_status, "error": error})
        return status

    async def _post(self, row: dict[str, Any]) -> int:
        # Each step has a deadline of its own: httpx's timeout is per read, so a receiver that
        # trickles its answer a byte at a time would otherwise hold the attempt (and its
        # lease) indefinitely.
        async with asyncio.timeout(self.timeout_s):
            checked = await asyncio.to_thread(check_callback_url, row["url"], self.ports,
                                              self.allow, self.resolver)
        if checked.code == netcheck.DNS_FAILED:
            raise OSError(checked.reason)  # may resolve later: retried
        if not checked.ok or checked.url is None:
            raise Refused(checked.reason)
        target = checked.url
        body = orjson.dumps(payload(row))
        ts = int(time.time())
        headers = {
            "Host": target.host_header, "Content-Type": "application/json",
            "User-Agent": USER_AGENT, "X-SafeURL-Event": EVENT,
            "X-SafeURL-Delivery": str(row["id"]), "X-SafeURL-Timestamp": str(ts),
            "X-SafeURL-Signature": sign(self.secret, ts, body),
        }
        ip = ipaddress.ip_address(checked.addresses[0])
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        # Connect to the checked address; TLS still verifies the certificate for the name.
        # Only the status counts: the answer's body is never read (closing the response
        # unread drops the connection), so a receiver cannot make us buffer anything.
        async with asyncio.timeout(self.timeout_s), self.client.stream(
                "POST", f"{target.scheme}://{host}:{target.port}{target.path}", content=body,
                headers=headers, extensions={"sni_hostname": target.host}) as resp:
            return resp.status_code
