"""Politeness per target domain (safeurl_worker/politeness.py): the politeness key of a URL, and
the fleet-wide gate against a real Redis, with separate clients standing in for replicas."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as redis

from safeurl_worker.politeness import DomainGate, target_domain

from .conftest import REDIS_URL

integration = pytest.mark.integration

# --- target_domain (pure) -----------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    # the registrable domain, public suffixes included
    ("https://a.example.co.uk/x", "example.co.uk"),
    ("https://b.example.co.uk:8443/y?z", "example.co.uk"),
    ("http://deep.sub.Example.COM./", "example.com"),
    ("https://example.com", "example.com"),
    ("http://alice.github.io/", "alice.github.io"),  # a platform suffix: one site per user
    ("http://localhost:3000/", "localhost"),
    # userinfo is not the host; '\' is '/' to a browser, so the host is evil.test
    ("http://user:pw@www.example.org/", "example.org"),
    ("http://good.example.com@www.evil-site.net/", "evil-site.net"),
    ("http://evil.test\\@good.example.com/", "evil.test"),
    # IDN: UTS #46 like the fetcher, so both spellings share one key
    ("http://www.münchen.de/", "xn--mnchen-3ya.de"),
    ("http://xn--mnchen-3ya.de/", "xn--mnchen-3ya.de"),
    ("http://faß.de/", "xn--fa-hia.de"),
    # IP literals: the canonical address, any spelling
    ("http://192.168.0.1:8080/", "192.168.0.1"),
    ("http://0x7f.1/", "127.0.0.1"),
    ("http://[::1]:8080/", "::1"),
    ("http://[2001:DB8:0::0:1]/", "2001:db8::1"),
])
def test_target_domain(url: str, expected: str) -> None:
    assert target_domain(url) == expected


@pytest.mark.parametrize("url", [
    "", "   ", "not a url", "example.com", "http://", "http://[::1/", "http://exa mple.com/",
    "mailto:a@example.com", "data:text/html,hi", "foo://example.com/", "http://xn--a/",
])
def test_target_domain_of_garbage_is_none(url: str) -> None:
    assert target_domain(url) is None


def test_subdomains_share_a_key_and_sites_do_not() -> None:
    assert target_domain("https://a.example.co.uk/") == target_domain("http://b.example.co.uk/")
    assert target_domain("https://example.co.uk/") != target_domain("https://other.co.uk/")


# --- the gate against real Redis --------------------------------------------------------------


@dataclass
class Fleet:
    """Gates sharing one key prefix, each on its own client: one replica each."""

    prefix: str
    clients: list[redis.Redis] = field(default_factory=list)

    def gate(self, limit: int = 2, interval_ms: int = 0, hold_ms: int = 10_000,
             max_sleep_s: float = 1.0) -> DomainGate:
        client = redis.Redis.from_url(REDIS_URL)
        self.clients.append(client)
        return DomainGate(client, self.prefix, limit, interval_ms, hold_ms,
                          max_sleep_s=max_sleep_s)

    @property
    def redis(self) -> redis.Redis:
        return self.clients[0]

    async def keys(self) -> list[str]:
        return sorted([k.decode() async for k in self.redis.scan_iter(match=self.prefix + "*")])

    async def held_by(self, domain: str) -> list[str]:
        members = await self.redis.zrange(self.prefix + domain, 0, -1)
        return [m.decode() if isinstance(m, bytes) else str(m) for m in members]


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    # The hash tag puts every key of the test in one slot, as the worker's prefix does.
    f = Fleet(f"t-politeness:{{{uuid.uuid4().hex[:8]}}}:")
    f.gate()  # the fixture's own client, for looking at keys
    yield f
    for key in await f.keys():
        await f.redis.delete(key)
    for client in f.clients:
        await client.aclose()


@integration
async def test_limit_holds_across_replicas_under_contention(fleet: Fleet) -> None:
    replicas = [fleet.gate(limit=2, max_sleep_s=0.2) for _ in range(3)]
    stopping = asyncio.Event()
    inside = peak = 0
    served: list[int] = []

    async def job(i: int) -> None:
        nonlocal inside, peak
        gate = replicas[i % 3]
        assert await gate.acquire("example.com", f"job-{i}", stopping)
        inside += 1  # counted after the grant and uncounted before the release: never more
        peak = max(peak, inside)  # than Redis has holders, so a gate letting 3 in shows here
        assert await gate.holders("example.com") <= 2
        await asyncio.sleep(0.03)
        inside -= 1
        await gate.release("example.com", f"job-{i}")
        served.append(i)

    async with asyncio.timeout(30):
        await asyncio.gather(*(job(i) for i in range(30)))
    assert peak == 2  # the limit is reached, never exceeded
    assert sorted(served) == list(range(30))  # everyone was served
    assert await replicas[0].holders("example.com") == 0
    assert await fleet.keys() == []  # nothing left behind


@integration
async def test_interval_between_starts_across_replicas(fleet: Fleet) -> None:
    replicas = [fleet.gate(limit=10, interval_ms=150) for _ in range(2)]
    stopping = asyncio.Event()
    starts: list[float] = []

    async def job(i: int) -> None:
        gate = replicas[i % 2]
        assert await gate.acquire("pace.example", f"job-{i}", stopping)
        starts.append(time.monotonic())
        await gate.release("pace.example", f"job-{i}")  # a release does not skip the interval

    async with asyncio.timeout(10):
        await asyncio.gather(*(job(i) for i in range(5)))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Redis spaces the grants by 150 ms of its clock; seeing the replies adds a little jitter.
    assert min(gaps) >= 0.13, gaps
    wait = await replicas[0].try_acquire("pace.example", "late")  # right after the last start
    assert 0 < wait <= 0.15


@integration
async def test_a_killed_holder_stops_counting_after_hold_ms(fleet: Fleet) -> None:
    dead = fleet.gate(limit=2, hold_ms=300)
    live = fleet.gate(limit=2, hold_ms=10_000)  # its hold keeps the key alive: the lapsed
    assert await live.try_acquire("d.example", "survivor") == 0.0  # one must go by its score
    assert await dead.try_acquire("d.example", "killed") == 0.0
    # The replica dies: no renew, no release.
    wait = await live.try_acquire("d.example", "next")
    assert 0 < wait <= 0.3  # the hint: when the lapsed hold frees the place
    assert await live.holders("d.example") == 2
    await asyncio.sleep(wait + 0.05)
    assert await live.holders("d.example") == 1
    assert await live.try_acquire("d.example", "next") == 0.0
    assert await fleet.held_by("d.example") == ["survivor", "next"]


@integration
async def test_a_renewed_holder_keeps_its_hold(fleet: Fleet) -> None:
    gate, other = fleet.gate(limit=1, hold_ms=300), fleet.gate(limit=1, hold_ms=300)
    assert await gate.try_acquire("r.example", "keeper") == 0.0
    assert await gate.try_acquire("s.example", "keeper-2") == 0.0
    async with asyncio.timeout(5):
        for _ in range(8):  # 800 ms: well past hold_ms, renewed every 100 ms
            await asyncio.sleep(0.1)
            await gate.renew([("r.example", "keeper"), ("s.example", "keeper-2")])
            assert await other.try_acquire("r.example", "other") > 0
            assert await other.try_acquire("s.example", "other") > 0
        await asyncio.sleep(0.35)  # renewals stop: the hold lapses
    assert await other.try_acquire("r.example", "other") == 0.0
    await gate.renew([("s.example", "keeper-2")])  # too late: a lapsed hold is not revived
    assert await gate.holders("s.example") == 0


@integration
async def test_reacquire_is_idempotent_and_domains_are_independent(fleet: Fleet) -> None:
    gate = fleet.gate(limit=1, interval_ms=10_000)
    assert await gate.try_acquire("a.example", "h") == 0.0
    assert await gate.try_acquire("a.example", "h") == 0.0  # a retry: no second place,
    assert await gate.holders("a.example") == 1  # and no new start for the interval
    assert await gate.acquire("a.example", "h", asyncio.Event())
    assert await gate.try_acquire("a.example", "other") > 0
    assert await gate.try_acquire("b.example", "other") == 0.0


@integration
async def test_refused_and_released_non_holders_leave_nothing(fleet: Fleet) -> None:
    gate = fleet.gate(limit=1, interval_ms=500)
    assert await gate.try_acquire("x.example", "h1") == 0.0
    assert await gate.try_acquire("x.example", "h2") > 0  # refused by the limit
    await gate.release("x.example", "nobody")  # harmless
    await gate.release("never.example", "nobody")  # creates nothing
    assert await fleet.held_by("x.example") == ["h1"]
    await gate.release("x.example", "h1")
    assert await gate.try_acquire("x.example", "h3") > 0  # refused by the interval
    assert await fleet.keys() == [fleet.prefix + "x.example:last"]  # only the start marker


@integration
async def test_limit_zero_is_no_limit(fleet: Fleet) -> None:
    gate = fleet.gate(limit=0)
    for i in range(20):
        assert await gate.try_acquire("busy.example", f"h{i}") == 0.0
    assert await gate.acquire("busy.example", "h", asyncio.Event())
    await gate.renew([("busy.example", "h")])
    await gate.release("busy.example", "h")
    assert await fleet.keys() == []  # it never spoke to Redis
    paced = fleet.gate(limit=0, interval_ms=5000)  # only the interval then
    assert await paced.try_acquire("busy.example", "h1") == 0.0
    assert await paced.try_acquire("busy.example", "h2") > 0


@integration
async def test_acquire_returns_false_promptly_when_stopping(fleet: Fleet) -> None:
    gate = fleet.gate(limit=1, max_sleep_s=5)
    assert await gate.try_acquire("slow.example", "holder") == 0.0
    stopping = asyncio.Event()
    waiter = asyncio.create_task(gate.acquire("slow.example", "waiter", stopping))
    queued = asyncio.create_task(gate.acquire("slow.example", "queued", stopping))
    await asyncio.sleep(0.1)
    assert not waiter.done() and not queued.done()
    started = time.monotonic()
    stopping.set()
    async with asyncio.timeout(1):
        assert await waiter is False
        assert await queued is False
    assert time.monotonic() - started < 0.5  # not the 5 s sleep
    assert await fleet.held_by("slow.example") == ["holder"]  # the waiters left nothing
    assert not gate._waiting
    assert await gate.acquire("slow.example", "late", stopping) is False  # already stopping


@integration
async def test_a_local_release_wakes_the_waiter_at_once(fleet: Fleet) -> None:
    gate = fleet.gate(limit=1, max_sleep_s=5)  # without the wake-up it would sleep 5 s
    assert await gate.try_acquire("w.example", "holder") == 0.0
    waiter = asyncio.create_task(gate.acquire("w.example", "waiter", asyncio.Event()))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await gate.release("w.example", "holder")
    async with asyncio.timeout(2):
        assert await waiter
    assert time.monotonic() - started < 1  # not the 5 s sleep
    assert await fleet.held_by("w.example") == ["waiter"]


@integration
async def test_another_replicas_release_is_seen_within_max_sleep(fleet: Fleet) -> None:
    a, b = fleet.gate(limit=1), fleet.gate(limit=1, max_sleep_s=0.3)
    assert await a.try_acquire("far.example", "holder") == 0.0
    waiter = asyncio.create_task(b.acquire("far.example", "waiter", asyncio.Event()))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await a.release("far.example", "holder")
    async with asyncio.timeout(2):
        assert await waiter
    assert time.monotonic() - started < 0.6  # max_sleep_s, not the 10 s hint


@integration
async def test_local_waiters_are_served_in_arrival_order(fleet: Fleet) -> None:
    gate = fleet.gate(limit=1, max_sleep_s=5)
    assert await gate.try_acquire("q.example", "first") == 0.0
    stopping = asyncio.Event()
    order: list[int] = []

    async def job(i: int) -> None:
        assert await gate.acquire("q.example", f"job-{i}", stopping)
        order.append(i)
        await asyncio.sleep(0.01)
        await gate.release("q.example", f"job-{i}")

    tasks = [asyncio.create_task(job(i)) for i in range(5)]
    await asyncio.sleep(0.1)
    await gate.release("q.example", "first")
    async with asyncio.timeout(5):
        await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert not gate._waiting


@integration
async def test_a_higher_lane_waiter_goes_before_earlier_lower_ones(fleet: Fleet) -> None:
    """An interactive scan of a site a bulk import also scans is not queued behind it."""
    gate = fleet.gate(limit=1, max_sleep_s=5)
    assert await gate.try_acquire("r.example", "first") == 0.0
    stopping = asyncio.Event()
    order: list[str] = []

    async def job(name: str, rank: int) -> None:
        assert await gate.acquire("r.example", name, stopping, rank=rank)
        order.append(name)
        await gate.release("r.example", name)

    tasks = [asyncio.create_task(job(f"bulk-{i}", 2)) for i in range(4)]
    await asyncio.sleep(0.1)
    tasks.append(asyncio.create_task(job("interactive", 0)))
    await asyncio.sleep(0.1)
    await gate.release("r.example", "first")
    async with asyncio.timeout(5):
        await asyncio.gather(*tasks)
    # bulk-0 held the turn (it was asking Redis) when the interactive one arrived; the
    # interactive one is next, before the three bulk scans that came before it.
    assert order == ["bulk-0", "interactive", "bulk-1", "bulk-2", "bulk-3"]
    assert not gate._waiting


@integration
async def test_a_cancelled_waiter_passes_its_turn_on(fleet: Fleet) -> None:
    gate = fleet.gate(limit=1, max_sleep_s=5)
    assert await gate.try_acquire("c.example", "holder") == 0.0
    stopping = asyncio.Event()
    first = asyncio.create_task(gate.acquire("c.example", "first", stopping))
    second = asyncio.create_task(gate.acquire("c.example", "second", stopping))
    await asyncio.sleep(0.1)  # `first` polls Redis, `second` waits for its turn
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    await gate.release("c.example", "holder")
    async with asyncio.timeout(1):
        assert await second
    assert await fleet.held_by("c.example") == ["second"]
    assert not gate._waiting


@integration
async def test_keys_expire_on_their_own(fleet: Fleet) -> None:
    gate = fleet.gate(limit=2, interval_ms=200, hold_ms=5000)
    key = fleet.prefix + "ttl.example"
    assert await gate.try_acquire("ttl.example", "a") == 0.0
    assert 4000 < await fleet.redis.pttl(key) <= 5001
    assert 0 < await fleet.redis.pttl(key + ":last") <= 200
    await asyncio.sleep(0.25)
    assert await gate.try_acquire("ttl.example", "b") == 0.0
    await gate.release("ttl.example", "a")
    assert 4000 < await fleet.redis.pttl(key) <= 5001  # b still holds: as long as b's hold
    await gate.release("ttl.example", "b")
    assert await fleet.redis.exists(key) == 0
    assert 0 < await fleet.redis.pttl(key + ":last") <= 200
    await asyncio.sleep(0.25)
    assert await fleet.keys() == []
    # A hold that is neither renewed nor released takes its key with it.
    short = fleet.gate(limit=2, hold_ms=200)
    assert await short.try_acquire("ttl.example", "killed") == 0.0
    assert 0 < await fleet.redis.pttl(key) <= 201
    await asyncio.sleep(0.3)
    assert await fleet.keys() == []


async def test_bad_settings_are_refused() -> None:
    client = redis.Redis.from_url(REDIS_URL)  # never connects
    with pytest.raises(ValueError, match="hold_ms"):
        DomainGate(client, "p:", 2, 0, 0)
    with pytest.raises(ValueError, match="limit"):
        DomainGate(client, "p:", -1, 0, 1000)
    await client.aclose()
