"""The stream consumer against a real Redis: ownership-checked renew/ack, dead letters, trim."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from safeurl_worker.consumer import Consumer, Message, Queue, hash_tag, lane_stream

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
    assert await a.read(10, 100) == []  # the group is recreated by the read itself
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


# --- lanes and tenant queues ------------------------------------------------------------------

LANES = {"interactive": 3, "default": 1, "bulk": 1}


@pytest.fixture
async def laned() -> AsyncIterator[tuple[Consumer, Consumer]]:
    """Two replicas reading three lanes; tenant `capped` may have 2 in flight."""
    stream = f"t-lanes-{uuid.uuid4().hex[:8]}"
    ra, rb = redis.Redis.from_url(REDIS_URL), redis.Redis.from_url(REDIS_URL)

    def caps(tenant: str) -> int:
        return 2 if tenant == "capped" else 0

    a = Consumer(ra, stream, "g", "a", f"{stream}:dead", lanes=LANES, max_in_flight=caps)
    b = Consumer(rb, stream, "g", "b", f"{stream}:dead", lanes=LANES, max_in_flight=caps)
    await a.ensure_group()
    yield a, b
    keys = [k async for k in ra.scan_iter(match=f"*{stream}*")]
    if keys:
        await ra.delete(*keys)
    await ra.aclose()
    await rb.aclose()


async def fill(c: Consumer, n: int, lane: str | None = None, tenant: str | None = None) -> None:
    for _ in range(n):
        await c.enqueue(uuid.uuid4(), lane=lane, tenant=tenant)


def lanes_of(msgs: list[Message]) -> list[str]:
    return [m.queue.lane if m.queue else "default" for m in msgs]


async def test_lanes_are_read_by_weight_and_none_is_starved(
        laned: tuple[Consumer, Consumer]) -> None:
    a, _ = laned
    for lane in LANES:
        await fill(a, 40, lane)
    one_by_one = [m for _ in range(25) for m in await a.read(1, 10)]
    assert Counter(lanes_of(one_by_one)) == {"interactive": 15, "default": 5, "bulk": 5}
    batch = await a.read(25, 10)  # one call: the same shares
    assert Counter(lanes_of(batch)) == {"interactive": 15, "default": 5, "bulk": 5}
    # Every message says which queue it came from, and acks there.
    for m in one_by_one + batch:
        assert m.stream == lane_stream(a.stream, lanes_of([m])[0])
        await m.ack()
    for lane in LANES:
        assert (await a.redis.xpending(lane_stream(a.stream, lane), "g"))["pending"] == 0


async def test_an_empty_lane_leaves_its_share_to_the_others(
        laned: tuple[Consumer, Consumer]) -> None:
    a, _ = laned
    await fill(a, 10, "bulk")
    assert lanes_of(await a.read(10, 10)) == ["bulk"] * 10


async def test_tenants_of_a_lane_take_turns_whatever_their_backlog(
        laned: tuple[Consumer, Consumer]) -> None:
    a, b = laned
    await fill(a, 200, "bulk", "flood")
    await fill(a, 3, "bulk", "small")  # submitted after the flood
    got = [m for _ in range(3) for m in await b.read(2, 10)]
    tenants = [m.queue.tenant if m.queue else None for m in got]
    assert sorted(t for t in tenants if t == "small") == ["small"] * 3, tenants
    assert tenants.count("flood") == 3


async def test_a_tenant_at_its_in_flight_quota_is_skipped(
        laned: tuple[Consumer, Consumer]) -> None:
    a, b = laned
    await fill(a, 10, "default", "capped")
    await fill(a, 5, "default", "other")
    first = await a.read(10, 10)
    second = await b.read(10, 10)  # another replica: the quota is the fleet's
    capped = [m for m in first + second if m.queue and m.queue.tenant == "capped"]
    assert len(capped) == 2 and len(first + second) == 7
    await capped[0].ack()
    [nxt] = await b.read(10, 10)
    assert nxt.queue is not None and nxt.queue.tenant == "capped"


async def test_a_blocked_read_wakes_for_any_queue(laned: tuple[Consumer, Consumer]) -> None:
    a, b = laned
    await a.queues(fresh=True)
    for lane, tenant in [("bulk", None), ("interactive", "late")]:
        reader = asyncio.create_task(b.read(5, 3000))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await a.enqueue(uuid.uuid4(), lane=lane, tenant=tenant)
        got = await asyncio.wait_for(reader, 5)
        # A tenant queue new to the reader rings the registry's doorbell.
        assert time.monotonic() - t0 < 1.5
        assert [(m.queue.lane, m.queue.tenant) for m in got if m.queue] == [(lane, tenant)]


async def test_keys_are_unique_across_queues(laned: tuple[Consumer, Consumer]) -> None:
    a, _ = laned
    await a.redis.xadd(lane_stream(a.stream, "bulk"), {"job_id": "x"}, id="5-0")
    await a.redis.xadd(a.stream, {"job_id": "y"}, id="5-0")
    got = await a.read(10, 10)
    assert len({m.key for m in got}) == 2 and {m.message_id for m in got} == {"5-0"}
    await a.beat("life", 60_000)
    assert await a.renew([m.key for m in got]) == {}
    for m in got:
        await m.ack()
    assert await a.renew([m.key for m in got]) == {m.key: "gone" for m in got}


async def test_every_queue_is_seen_by_the_janitor_and_handed_back(
        laned: tuple[Consumer, Consumer]) -> None:
    a, b = laned
    ids = [uuid.uuid4() for _ in range(4)]
    await a.enqueue(ids[0])
    await a.enqueue(ids[1], lane="bulk")
    await a.enqueue(ids[2], lane="bulk", tenant="t1")  # no group yet: all undelivered
    await a.enqueue(ids[3], lane="interactive", tenant="t2")
    found, complete = await b.job_ids_in_stream()
    assert found == set(ids) and complete
    got = await a.read(10, 10)
    assert len(got) == 4
    assert (await b.job_ids_in_stream())[0] == set(ids)  # pending ones too
    assert await a.hand_back(15_000) == 4
    await a.stop_beat("none", 60_000)
    taken = await b.reclaim(min_idle_ms=15_000, count=10)
    assert {m.key for m in taken} == {m.key for m in got}


async def test_an_emptied_tenant_queue_is_dropped_and_comes_back(
        laned: tuple[Consumer, Consumer]) -> None:
    a, b = laned
    await a.enqueue(uuid.uuid4(), lane="bulk", tenant="t1")
    [m] = await a.read(10, 10)
    await a.remove_idle_consumers(10**9)
    assert len(await a.queues(fresh=True)) == 4  # pending: kept
    await m.ack()
    await a.remove_idle_consumers(10**9)
    assert len(await a.queues(fresh=True)) == 3 and not await a.redis.exists(m.stream)
    assert await b.read(10, 10) == []  # a reader that still lists it: nothing, no error
    await a.enqueue(uuid.uuid4(), lane="bulk", tenant="t1")
    got = await b.read(10, 1000) or await b.read(10, 1000)
    assert [x.queue.tenant for x in got if x.queue] == ["t1"]


async def test_dead_letter_from_a_tenant_queue(laned: tuple[Consumer, Consumer]) -> None:
    a, _ = laned
    await a.enqueue(uuid.uuid4(), lane="bulk", tenant="t1")
    [m] = await a.read(10, 10)
    await m.dead_letter("UNKNOWN_JOB")
    [(_, fields)] = await a.redis.xrange(a.dead_letter_stream)
    assert fields[b"queue"] == m.stream.encode() and fields[b"tenant"] == b"t1"
    assert (await a.redis.xpending(m.stream, "g"))["pending"] == 0


async def test_enqueue_refuses_an_unknown_lane(laned: tuple[Consumer, Consumer]) -> None:
    a, _ = laned
    with pytest.raises(ValueError, match="unknown lane 'urgent'"):
        await a.enqueue(uuid.uuid4(), lane="urgent")


async def test_a_tenants_in_flight_quota_counts_all_its_lanes(
        laned: tuple[Consumer, Consumer]) -> None:
    a, b = laned
    await fill(a, 3, "interactive", "capped")
    await fill(a, 3, "bulk", "capped")
    got = await a.read(10, 10) + await b.read(10, 10)
    assert len(got) == 2, [(m.queue.lane, m.queue.tenant) for m in got if m.queue]


async def test_a_read_with_only_capped_work_looks_again_soon(
        laned: tuple[Consumer, Consumer]) -> None:
    a, b = laned
    await fill(a, 3, "default", "capped")
    held = await a.read(10, 10)
    assert len(held) == 2
    reader = asyncio.create_task(b.read(10, 5000))
    await asyncio.sleep(0.1)
    await held[0].ack()  # frees the quota; no XADD wakes the blocked read
    t0 = time.monotonic()
    got = await asyncio.wait_for(reader, 5)
    assert [m.queue.tenant for m in got if m.queue] == ["capped"]
    assert time.monotonic() - t0 < 1.0


async def test_renew_reports_a_lost_tenant_queue_and_keeps_the_others(
        laned: tuple[Consumer, Consumer]) -> None:
    a, _ = laned
    await a.enqueue(uuid.uuid4(), lane="bulk", tenant="t1")
    await a.enqueue(uuid.uuid4())
    got = await a.read(10, 10)
    assert len(got) == 2
    lost = next(m for m in got if m.queue and m.queue.tenant)
    await a.redis.delete(lost.stream)  # Redis lost it (a failover, an operator's DEL)
    assert await a.renew([m.key for m in got]) == {lost.key: "gone"}
    assert not a.data_lost.is_set()


def test_every_key_of_a_tagged_stream_is_in_one_cluster_slot() -> None:
    from redis.crc import key_slot

    c = Consumer(redis.Redis(), "{scan-jobs}", "g", "a", "{scan-jobs}:dead", lanes=LANES)
    keys = [c.registry, c.doorbell, c.heartbeat_key("a"), c.dead_letter_stream,
            *(Queue.of(c.stream, lane, t).stream for lane in LANES for t in (None, "acme"))]
    assert {key_slot(k.encode()) for k in keys} == {key_slot(b"scan-jobs")}
    assert hash_tag("scan-jobs") == "{scan-jobs}" and hash_tag("a{b}c") == "{b}"
