"""The stream consumer against a real Redis: ownership-checked renew/ack, dead letters, trim."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from redis.exceptions import ResponseError

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
    await ra.delete(stream, f"{stream}:dead", a.heartbeat_key("a"), a.heartbeat_key("alive"))
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


async def test_takeover_only_from_a_consumer_without_heartbeat(
        pair: tuple[Consumer, Consumer]) -> None:
    a, b = pair
    await a.beat("life-1", 60_000)
    mid = (await a.redis.xadd(a.stream, {"job_id": "j"})).decode()
    [d] = await a.read(10, 100)
    assert d.message_id == mid and not d.reclaimed
    assert await b.reclaim(min_idle_ms=0, count=10) == []  # a beats: its entry stays a's
    assert await a.owner_state("a", "life-1") == "alive"
    assert await a.owner_state("a", "life-0") == "dead"  # an earlier life of the same id
    await a.stop_beat("life-1", 60_000)  # a clean exit
    assert await a.owner_state("a", "life-1") == "stopped"
    got = await b.reclaim(min_idle_ms=0, count=10)
    assert [g.message_id for g in got] == [mid] and got[0].reclaimed
    assert got[0].deliveries == 2 and got[0].fields == {"job_id": "j"}
    assert await a.renew([mid]) == {mid: "taken"}  # a lost it: no stealing back
    assert await b.renew([mid]) == {}
    assert await b.ack([mid]) == 1
    assert (await a.redis.xpending(a.stream, "g"))["pending"] == 0


async def test_a_redis_restart_is_noticed_by_its_run_id(pair: tuple[Consumer, Consumer]) -> None:
    a, _ = pair
    assert await a.check_restart() is False  # the first look only remembers
    assert await a.check_restart() is False
    a._run_id = "another-server"  # as if Redis had been restarted since
    a.data_lost.clear()
    assert await a.check_restart() is True
    assert a.data_lost.is_set() and a.steady_for() < 1


async def test_a_dead_consumers_fresh_entry_waits_for_the_lease(
        pair: tuple[Consumer, Consumer]) -> None:
    a, b = pair
    await a.redis.xadd(a.stream, {"job_id": "j"})
    await a.read(10, 100)  # a never beat, but the entry is fresh
    assert await b.reclaim(min_idle_ms=60_000, count=10) == []


async def test_reclaim_follows_its_cursor_past_many_live_entries(
        pair: tuple[Consumer, Consumer]) -> None:
    a, b = pair
    dead = Consumer(a.redis, a.stream, "g", "dead", a.dead_letter_stream)
    await a.beat("alive", 60_000)
    for i in range(30):
        await a.redis.xadd(a.stream, {"job_id": f"live-{i}"})
    await a.read(100, 100)
    for i in range(5):
        await a.redis.xadd(a.stream, {"job_id": f"dead-{i}"})
    await dead.read(100, 100)
    got: list[str] = []
    for _ in range(6):  # 35 entries, 10 looked at per call: the cursor must move on
        got += [m.fields["job_id"] for m in await b.reclaim(min_idle_ms=0, count=10, scan=10)]
    assert sorted(got) == [f"dead-{i}" for i in range(5)]


async def test_own_entries_are_adopted_after_a_restart(pair: tuple[Consumer, Consumer]) -> None:
    a, _ = pair
    await a.redis.xadd(a.stream, {"job_id": "j"})
    [d] = await a.read(10, 100)
    reborn = Consumer(a.redis, a.stream, "g", "a", a.dead_letter_stream)  # same WORKER_ID
    assert await reborn.adopt(60_000, set(), 10) == []  # not idle for a lease yet
    assert await reborn.adopt(0, {d.message_id}, 10) == []  # running here: left alone
    [again] = await reborn.adopt(0, set(), 10)
    assert again.message_id == d.message_id and again.reclaimed and again.deliveries == 2


async def test_a_deleted_stream_is_recreated_and_reported(
        pair: tuple[Consumer, Consumer]) -> None:
    a, _ = pair
    mid = (await a.redis.xadd(a.stream, {"job_id": "j"})).decode()
    await a.read(10, 100)
    await a.redis.delete(a.stream)  # an empty restart, a failover that lost it, a DEL
    with pytest.raises(ResponseError, match="NOGROUP"):
        await a.read(10, 100)
    assert a.data_lost.is_set() and a.steady_for() < 1
    assert await a.renew([mid]) == {mid: "gone"}  # the job may finish; its ack is a no-op
    assert await a.ack([mid]) == 0
    await a.redis.xadd(a.stream, {"job_id": "k"})
    assert [m.fields for m in await a.read(10, 100)] == [{"job_id": "k"}]


async def test_dead_letter_stream_is_bounded(pair: tuple[Consumer, Consumer]) -> None:
    a, _ = pair
    bounded = Consumer(a.redis, a.stream, "g", "a", a.dead_letter_stream, dead_letter_maxlen=100)
    for i in range(1000):
        await a.redis.xadd(a.stream, {"job_id": str(i)})
    for m in await bounded.read(1000, 100):
        await m.dead_letter("MALFORMED_MESSAGE")
    assert 100 <= await a.redis.xlen(a.dead_letter_stream) < 300  # MAXLEN ~: whole nodes


async def test_idle_empty_dead_consumers_are_removed(pair: tuple[Consumer, Consumer]) -> None:
    a, b = pair
    await a.redis.xadd(a.stream, {"job_id": "j"})
    [m] = await b.read(10, 100)
    await m.ack()
    await a.redis.xadd(a.stream, {"job_id": "k"})
    keeper = Consumer(a.redis, a.stream, "g", "keeper", a.dead_letter_stream)
    await keeper.read(10, 100)  # holds an entry: kept
    alive = Consumer(a.redis, a.stream, "g", "alive", a.dead_letter_stream)
    await alive.beat("x", 60_000)
    await a.redis.xadd(a.stream, {"job_id": "l"})
    [n] = await alive.read(10, 10)
    await n.ack()  # holds nothing, but beats: kept
    assert await a.remove_idle_consumers(0) == 1  # b: empty, no heartbeat
    names = {c["name"].decode() for c in await a.redis.xinfo_consumers(a.stream, "g")}
    assert names == {"a", "keeper", "alive"}  # a: the caller itself


async def test_dead_letter_is_written_once_per_message(pair: tuple[Consumer, Consumer]) -> None:
    a, _ = pair
    await a.redis.xadd(a.stream, {"job_id": "nope"})
    [d] = await a.read(10, 100)
    await d.dead_letter("MALFORMED_MESSAGE")
    await d.dead_letter("MALFORMED_MESSAGE")  # a retry after a lost reply
    await a.redis.xgroup_destroy(a.stream, "g")  # the group lost: the entry comes back
    await a.ensure_group()
    [again] = await a.read(10, 100)
    await again.dead_letter("MALFORMED_MESSAGE")
    assert await a.redis.xlen(a.dead_letter_stream) == 1
    assert (await a.redis.xpending(a.stream, "g"))["pending"] == 0


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
