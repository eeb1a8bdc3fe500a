"""Politeness per target domain: a fleet-wide gate on the scans of one registrable domain.

A bulk list full of one site must not send that site dozens of concurrent fetches from every
replica (the quickest way to get our egress addresses blocked), so a scan first takes a place
at its domain's gate: at most `limit` holders of a domain at once across the whole fleet
(PER_DOMAIN_CONCURRENCY), and at least `interval_ms` between two holders starting
(PER_DOMAIN_INTERVAL_MS). docs/contract.md, "Politeness per target domain".

How, in Redis (every operation is one Lua script, so check-and-take is atomic across replicas):

* `<key_prefix><domain>`: a ZSET holder (job id) -> expiry in ms of the *Redis server's* clock
  (`TIME`), so the replicas' clocks never matter. Expired holders are dropped on every touch: a
  replica killed while holding frees its places after `hold_ms` without anyone cleaning up.
  Holders renew (`renew`) while their scan runs, like the message lease.
* `<key_prefix><domain>:last`: the last start, expiring (PX) after the interval: while it
  exists, nobody new may start.
* Both keys expire on their own (the ZSET when its last holder would, the marker after the
  interval), so unused domains leave nothing behind; a refused holder writes nothing at all.
  The lead passes a prefix carrying the stream's hash tag, so a script's keys share one slot.

Waiting (`acquire`) happens in this process: the waiters for one domain queue here in arrival
order and only the first polls Redis (however many jobs of one site a replica has deferred),
sleeping by the hint Redis gives (capped) and woken at once when a holder of that domain is
released by this process. No global state: everything lives on the `DomainGate` instance.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
from typing import Any

import redis.asyncio as redis

from .fetcher.weburl import WebUrlError
from .urls import parse_url, registrable_domain

__all__ = ["DomainGate", "target_domain"]

# Shared by the scripts. Time is the server's, in ms; a holder whose expiry is <= now is gone.
_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function drop_expired(key, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
end
-- The key lives exactly as long as its latest holder would (an empty ZSET is removed by Redis).
local function keep_until_last(key, now)
  local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if top[2] then redis.call('PEXPIRE', key, tonumber(top[2]) - now + 1) end
end
"""

# KEYS: holders, last start. ARGV: holder, limit (0: none), interval_ms (0: none), hold_ms.
# Returns 0 when granted, else the ms after which trying again may succeed (>= 1).
_ACQUIRE = _PRELUDE + """
local now = now_ms()
local holder, limit = ARGV[1], tonumber(ARGV[2])
local interval, hold = tonumber(ARGV[3]), tonumber(ARGV[4])
drop_expired(KEYS[1], now)
if redis.call('ZSCORE', KEYS[1], holder) then
  -- Already ours (a retried call whose reply was lost, or a re-check): refresh, no new start.
  redis.call('ZADD', KEYS[1], now + hold, holder)
  keep_until_last(KEYS[1], now)
  return 0
end
local wait = 0
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  wait = tonumber(first[2]) - now  -- the earliest a place frees for certain
end
if interval > 0 then
  wait = math.max(wait, redis.call('PTTL', KEYS[2]))  -- -2 when there was no recent start
end
if wait > 0 then return math.max(1, wait) end
redis.call('ZADD', KEYS[1], now + hold, holder)
keep_until_last(KEYS[1], now)
if interval > 0 then redis.call('SET', KEYS[2], now, 'PX', interval) end
return 0
"""

# KEYS: holders of each pair. ARGV: hold_ms, then the holder of KEYS[i] at ARGV[i + 1].
# XX: a hold that already expired stays lost (its place may have been given to someone else).
_RENEW = _PRELUDE + """
local now = now_ms()
local hold = tonumber(ARGV[1])
local renewed = 0
for i, key in ipairs(KEYS) do
  drop_expired(key, now)
  renewed = renewed + redis.call('ZADD', key, 'XX', 'CH', now + hold, ARGV[i + 1])
  keep_until_last(key, now)
end
return renewed
"""

# KEYS: holders. ARGV: holder. Harmless for a holder that holds nothing.
_RELEASE = _PRELUDE + """
local now = now_ms()
redis.call('ZREM', KEYS[1], ARGV[1])
drop_expired(KEYS[1], now)
keep_until_last(KEYS[1], now)
return 0
"""

# KEYS: holders. Read-only: the live holders now.
_HOLDERS = _PRELUDE + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now_ms(), '+inf')
"""


def target_domain(url: str) -> str | None:
    """The politeness key of a URL: the registrable domain of its host (urls.registrable_domain,
    so a.example.co.uk and b.example.co.uk share example.co.uk), an IP literal's normalised
    address, None if the URL has no host we can parse (such a job is not limited)."""
    try:
        parsed = parse_url(url)
    except WebUrlError:
        return None
    # An opaque host (a non-special scheme) is nothing the fetcher connects to: not limited.
    if parsed.host_kind not in ("domain", "ipv4", "ipv6") or not parsed.host:
        return None
    return registrable_domain(parsed.host)


@dataclasses.dataclass(eq=False)
class _Waiters:
    """The waiters for one domain in this process, by (rank, arrival): an interactive scan is
    not queued behind a bulk import of the same site. Only the one holding the turn (its future
    is done) talks to Redis; when it is served or gives up, the first in order takes it."""

    queue: list[tuple[int, int, asyncio.Future[None]]] = dataclasses.field(default_factory=list)
    turn: asyncio.Future[None] | None = None  # the waiter asking Redis now
    arrivals: int = 0
    # Set by `release` in this process: the first waiter retries at once instead of sleeping.
    released: asyncio.Future[None] | None = None

    def pass_turn(self) -> None:
        """Give the turn to the first waiter in order, if nobody holds it."""
        if self.turn is None and self.queue:
            self.turn = self.queue[0][2]
            if not self.turn.done():
                self.turn.set_result(None)


class DomainGate:
    """At most `limit` holders per domain across every replica sharing `client`'s Redis and
    `key_prefix`, and `interval_ms` between two starts; a hold lapses `hold_ms` after it was
    taken or last renewed. limit 0 and interval 0: the gate is open (no Redis at all); limit 0
    with an interval: only the interval is enforced.

    Redis errors propagate to the caller (the worker retries transient ones). A caller
    cancelled inside `acquire` may hold the domain without knowing: it should `release`
    (harmless when not held), or the hold lapses after `hold_ms`.
    """

    def __init__(self, client: redis.Redis, key_prefix: str, limit: int,
                 interval_ms: int, hold_ms: int, *, max_sleep_s: float = 1.0) -> None:
        if limit < 0 or interval_ms < 0 or hold_ms <= 0 or max_sleep_s <= 0:
            raise ValueError("DomainGate: limit and interval_ms must be >= 0, hold_ms and "
                             "max_sleep_s > 0")
        self.redis = client
        self.key_prefix = key_prefix
        self.limit = limit
        self.interval_ms = interval_ms
        self.hold_ms = hold_ms
        # Other replicas' releases are not announced: a waiter looks again at least this often.
        self.max_sleep_s = max_sleep_s
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._holders = client.register_script(_HOLDERS)
        self._waiting: dict[str, _Waiters] = {}

    @property
    def open(self) -> bool:
        """True when the gate limits nothing (limit 0, no interval)."""
        return self.limit == 0 and self.interval_ms == 0

    def key(self, domain: str) -> str:
        """The ZSET of a domain's holders (its `:last` start marker sits next to it)."""
        if not domain:
            raise ValueError("DomainGate: empty domain")
        return self.key_prefix + domain

    async def try_acquire(self, domain: str, holder: str) -> float:
        """0.0: granted (holder now counts against the domain until released or hold_ms
        passes without renew); otherwise the seconds after which trying again may succeed.
        Idempotent: a holder that already holds the domain is granted again (refreshes)."""
        if self.open:
            return 0.0
        key = self.key(domain)
        wait_ms = await self._acquire(
            keys=[key, key + ":last"],
            args=[holder, self.limit, self.interval_ms, self.hold_ms])
        return int(wait_ms) / 1000

    async def acquire(self, domain: str, holder: str, stopping: asyncio.Event,
                      rank: int = 0) -> bool:
        """Wait until granted (True) or stopping is set (False). Sleeps by the hint from
        try_acquire (capped at max_sleep_s) and wakes early when a holder of that domain is
        released in this process. Never busy-loops. Among this process's waiters for the
        domain, a lower `rank` (a higher lane) goes first, then arrival order."""
        if stopping.is_set():
            return False
        if self.open:
            return True
        loop = asyncio.get_running_loop()
        waiters = self._waiting.setdefault(domain, _Waiters())
        turn: asyncio.Future[Any] = loop.create_future()
        waiters.arrivals += 1
        bisect.insort(waiters.queue, (rank, waiters.arrivals, turn), key=lambda w: w[:2])
        waiters.pass_turn()
        stop: asyncio.Future[Any] = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({turn, stop}, return_when=asyncio.FIRST_COMPLETED)
            while not stopping.is_set():
                # Taken before asking Redis, so a release during the call is not missed.
                if waiters.released is None or waiters.released.done():
                    waiters.released = loop.create_future()
                released: asyncio.Future[Any] = waiters.released
                wait = await self.try_acquire(domain, holder)
                if wait == 0.0:
                    return True
                await asyncio.wait({released, stop}, timeout=min(wait, self.max_sleep_s),
                                   return_when=asyncio.FIRST_COMPLETED)
            return False
        finally:
            stop.cancel()
            self._leave(domain, waiters, turn)

    def _leave(self, domain: str, waiters: _Waiters, turn: asyncio.Future[None]) -> None:
        """Leave the queue (served, stopping or cancelled); pass the turn on if it was ours,
        so the next waiter asks at once (the place may be free, or another one)."""
        waiters.queue = [w for w in waiters.queue if w[2] is not turn]
        if waiters.turn is turn:
            waiters.turn = None
        if not waiters.queue:
            if self._waiting.get(domain) is waiters:
                del self._waiting[domain]
        else:
            waiters.pass_turn()

    async def renew(self, holds: list[tuple[str, str]]) -> None:
        """Extend the expiry of (domain, holder) pairs still held; one round trip. A hold that
        already lapsed is not revived (its place may be someone else's now)."""
        if not holds or self.open:
            return
        await self._renew(keys=[self.key(domain) for domain, _ in holds],
                          args=[self.hold_ms, *(holder for _, holder in holds)])

    async def release(self, domain: str, holder: str) -> None:
        """Give the place back (harmless when holder holds nothing) and wake this process's
        first waiter for the domain."""
        if self.open:
            return
        await self._release(keys=[self.key(domain)], args=[holder])
        waiters = self._waiting.get(domain)
        if waiters is not None and waiters.released is not None \
                and not waiters.released.done():
            waiters.released.set_result(None)

    async def holders(self, domain: str) -> int:
        """The live holders of a domain now, fleet-wide (for tests and metrics)."""
        return int(await self._holders(keys=[self.key(domain)], args=[]))
