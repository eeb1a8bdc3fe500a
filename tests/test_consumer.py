"""The stream consumer against a real Redis: ownership-checked renew/ack, dead letters, trim."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from safeurl_worker.consumer import Consumer

from .conftest import REDIS_URL

pytestmark = pytest.mark.integration


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Consumer, Consumer]]:
    stream = f"t-consumer-{uuid.uuid4().hex[:8]}"
    ra, rb = redis.Redis.from_url(REDIS_URL), redis.Redis.from_url(REDIS_URL)
    a = Consumer(ra, stream, "g", "a", f"{stream}:dead")
    b = Consumer(rb, stream, "g", "b", f"{stream}:dead")
    await a.ensure_group()
    await b.ensure_group()  # an existing group is fine
    yield a, b
    await ra.delete(stream, f"{stream}:dead")
    await ra.aclose()
    await rb.aclose()


async def test_entries_added_before_the_group_are_delivered() -> None:
    stream = f"t-early-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(REDIS_URL)
    try:
        await r.xadd(stream, {"job_id": "x"})
        c = Consumer(r, stream, "g", "a", "dead")
        await c.ensure_group()
        got = await c.read(10, 100)
        assert [d.fields for d in got] == [{"job_id": "x"}]
    finally:
        await r.delete(stream)
        await r.aclose()


async def test_reclaim_takes_idle_entries_and_old_owner_cannot_renew_or_ack(
        pair: tuple[Consumer, Consumer]) -> None:
    a, b = pair
    mid = (await a.redis.xadd(a.stream, {"job_id": "j"})).decode()
    [d] = await a.read(10, 100)
    assert d.message_id == mid and not d.reclaimed
    assert await b.reclaim(min_idle_ms=60_000, count=10) == []  # lease still fresh
    got = await b.reclaim(min_idle_ms=0, count=10)
    assert [g.message_id for g in got] == [mid] and got[0].reclaimed
    assert got[0].deliveries == 2
    assert await a.renew([mid]) == set()  # a lost it: no stealing back
    assert await a.ack_if_owner(mid) is False  # and cannot ack it from under b
    assert await b.renew([mid]) == {mid}
    assert await b.ack_if_owner(mid) is True
    assert (await a.redis.xpending(a.stream, "g"))["pending"] == 0


async def test_own_pending_is_reread_after_restart(pair: tuple[Consumer, Consumer]) -> None:
    a, _ = pair
    await a.redis.xadd(a.stream, {"job_id": "j"})
    await a.read(10, 100)
    again = await a.read_own_pending()
    assert len(again) == 1 and again[0].reclaimed


async def test_dead_letter_copies_fields_and_acks(pair: tuple[Consumer, Consumer]) -> None:
    a, _ = pair
    mid = (await a.redis.xadd(a.stream, {"job_id": "nope", "extra": "1"})).decode()
    [d] = await a.read(10, 100)
    await a.dead_letter(d, "MALFORMED_MESSAGE")
    [(_, fields)] = await a.redis.xrange(a.dead_letter_stream)
    assert fields[b"job_id"] == b"nope" and fields[b"extra"] == b"1"
    assert fields[b"original_id"] == mid.encode() and fields[b"reason"] == b"MALFORMED_MESSAGE"
    assert (await a.redis.xpending(a.stream, "g"))["pending"] == 0


async def test_trim_never_removes_pending_or_undelivered(pair: tuple[Consumer, Consumer]) -> None:
    a, _ = pair
    ids = [(await a.redis.xadd(a.stream, {"job_id": str(i)})).decode() for i in range(6)]
    got = await a.read(4, 100)  # 0..3 delivered
    await a.ack([got[0].message_id, got[2].message_id, got[3].message_id])  # 1 still pending
    await a.trim()
    left = [m.decode() for m, _ in await a.redis.xrange(a.stream)]
    assert left[0] == ids[1]  # oldest pending kept; 0 (acked, older) trimmed
    assert ids[4] in left and ids[5] in left  # undelivered kept
    await a.ack([got[1].message_id])
    await a.trim()
    left = [m.decode() for m, _ in await a.redis.xrange(a.stream)]
    assert ids[1] not in left and ids[4] in left and ids[5] in left
