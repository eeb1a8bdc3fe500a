"""The stream consumer: everything this service says to Redis about `scan-jobs`.

Reading, heartbeats, takeover, acknowledgement, dead-lettering, hand-back and the janitor's
stream queries all live here, so the rules of message ownership are in one room:

* A message read by this consumer stays in the group's pending list (PEL) until it is acked.
* Ownership follows liveness, not clocks: each replica keeps a heartbeat key (value: a token of
  this process's life, TTL = `LEASE_TIMEOUT_MS`, renewed every `LEASE_RENEW_MS`). Another replica
  takes an entry over only when (1) its owner has no heartbeat, (2) the entry has been idle for a
  whole lease (the owner resets the idle time on renewal, so a just-read entry is never taken),
  and (3) the taker itself has reached Redis without error for a whole lease, so after a Redis
  restart or outage every live owner has beaten again before anyone judges it dead.
* `renew` and the takeover check ownership and act in one Lua script each: a worker whose
  message was taken must not steal it back. A clean exit leaves a "stopped" marker, so the next
  owner knows the work was handed back rather than lost with a crash.
* Acks: `Worker.settle` acks and dead-letters jobs. The one exception is here: an entry deleted
  from the stream while pending carries no job, so adopt/reclaim drop it from the PEL.
* A missing stream or group (an empty restart, a failover that lost the tail, a DEL) is recreated
  on the spot and reported through `data_lost`, so the janitor recovers the lost jobs from
  PostgreSQL at once.

The Lua scripts touch the heartbeat keys by name: they share the stream's hash tag, so all keys
live in one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as redis
from redis.exceptions import ResponseError

from .errors import is_transient

_RENEW = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 0 then
    lost[#lost + 1] = {ARGV[i], 'gone'}
  elseif p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = {ARGV[i], 'taken'}
  end
end
return lost
"""

# Take over entries of consumers without a heartbeat, walking the PEL from a cursor so dead
# entries behind many live ones are found too. Returns {next cursor, {{id, fields, count}}}.
_RECLAIM = """
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', tonumber(ARGV[6]), ARGV[4], '+',
                        tonumber(ARGV[5]))
local claimed = {}
local cursor = '-'
for _, r in ipairs(rows) do
  if #claimed >= tonumber(ARGV[7]) then break end
  cursor = '(' .. r[1]
  local beat = redis.call('GET', ARGV[3] .. r[2])
  if r[2] ~= ARGV[2] and ((not beat) or string.sub(beat, 1, 8) == 'stopped:') then
    local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[6]), r[1])
    if #got > 0 and got[1] and got[1][2] then
      claimed[#claimed + 1] = {got[1][1], got[1][2], r[4] + 1}
    elseif #got > 0 then
      redis.call('XACK', KEYS[1], ARGV[1], r[1])  -- deleted while pending: nothing to do
    end
  end
end
if #rows < tonumber(ARGV[5]) and #claimed < tonumber(ARGV[7]) then cursor = '-' end
return {cursor, claimed}
"""

# Dead-letter = ack + copy with reason, atomically, so an entry is never both lost and pending.
# A marker per message id makes it idempotent: a retry after a lost reply, or the same entry
# delivered again after its group was recreated, adds no second copy.
_DEAD_LETTER = """
if redis.call('SET', KEYS[3], '1', 'NX', 'EX', 604800) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
end
return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
"""

# A clean exit leaves "stopped:<token>" behind for a while: the next owner of its jobs knows
# they were handed back, not lost with a crash (no fault is counted against them).
_STOP_BEAT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], 'stopped:' .. ARGV[1], 'PX', ARGV[2])
end
return 0
"""
STOPPED = "stopped:"


@dataclasses.dataclass(slots=True)
class Message:
    """One stream entry handed to this worker; it carries its own ack."""

    message_id: str
    fields: dict[str, str]
    consumer: Consumer
    reclaimed: bool = False  # taken over from a dead owner, or our own previous life
    deliveries: int = 1
    read_at: float = dataclasses.field(default_factory=time.monotonic)

    async def ack(self) -> None:
        await self.consumer.ack_batched(self.message_id)

    async def dead_letter(self, reason: str) -> None:
        await self.consumer.dead_letter(self, reason)


def _decode(fields: Any) -> dict[str, str]:
    if not fields:
        return {}
    if isinstance(fields, list):  # a Lua reply: flat [k, v, k, v, ...]
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    return {_s(k): _s(v) for k, v in fields.items()}


def connect(dsn: str, block_ms: int = 1000) -> redis.Redis:
    """A client that never hangs: every command times out (a blocking read gets its block time
    on top), dead peers are found by TCP keepalive, and a dropped connection is re-made."""
    return redis.Redis.from_url(dsn, socket_timeout=5 + block_ms / 1000,
                                socket_connect_timeout=5, socket_keepalive=True,
                                health_check_interval=15)


class Consumer:
    def __init__(self, client: redis.Redis, stream: str, group: str, consumer: str,
                 dead_letter_stream: str, dead_letter_maxlen: int = 100_000) -> None:
        self.redis = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.dead_letter_stream = dead_letter_stream
        self.dead_letter_maxlen = dead_letter_maxlen
        self.heartbeat_prefix = f"safeurl:hb:{{{stream}}}:{group}:"
        self.data_lost = asyncio.Event()  # set when the stream or group had to be recreated
        self._last_error = time.monotonic()  # a new client has not yet proven Redis steady
        self._cursor = "-"
        self._ack_ids: list[str] = []
        self._ack_waiters: list[asyncio.Future[None]] = []
        self._ack_flusher: asyncio.Task[None] | None = None
        self._renew = client.register_script(_RENEW)
        self._reclaim = client.register_script(_RECLAIM)
        self._dead_letter = client.register_script(_DEAD_LETTER)
        self._stop_beat = client.register_script(_STOP_BEAT)
        self._run_id: str | None = None

    # --- health ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _talk(self) -> AsyncIterator[None]:
        """Every call goes through here: an outage is remembered (see `steady_for`), and a
        missing group is recreated before the error is passed on to be retried."""
        try:
            yield
        except ResponseError as exc:
            if str(exc).startswith("NOGROUP"):
                self._last_error = time.monotonic()
                await self.ensure_group()
                self.data_lost.set()
            raise
        except Exception as exc:
            if is_transient(exc):
                self._last_error = time.monotonic()
            raise

    def steady_for(self) -> float:
        """Seconds since the last failed call to Redis."""
        return time.monotonic() - self._last_error

    async def ensure_group(self) -> None:
        """Create the group (and the stream) if missing. Id 0: entries XADDed before any worker
        existed are delivered too (entries already done are recognised and acked)."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        # Visible in XINFO CONSUMERS from the start, not only after a first delivery.
        await self.redis.xgroup_createconsumer(self.stream, self.group, self.consumer)

    # --- heartbeats -------------------------------------------------------------------------

    def heartbeat_key(self, worker_id: str) -> str:
        return self.heartbeat_prefix + worker_id

    async def beat(self, token: str, ttl_ms: int) -> str | None:
        """Renew this replica's heartbeat; returns the value it replaced (None: it had expired
        or Redis lost it; another token: a second process runs under our WORKER_ID)."""
        async with self._talk():
            old = await self.redis.set(self.heartbeat_key(self.consumer), token, px=ttl_ms,
                                       get=True)
        return None if old is None else _s(old)

    async def owner_state(self, worker_id: str, token: str) -> str:
        """'alive' (the process life `token` of `worker_id` beats), 'stopped' (it exited
        cleanly, handing its work back) or 'dead'."""
        async with self._talk():
            current = await self.redis.get(self.heartbeat_key(worker_id))
        value = None if current is None else _s(current)
        if value == token:
            return "alive"
        return "stopped" if value == STOPPED + token else "dead"

    async def current_beat(self) -> str | None:
        """The value of our own heartbeat key (another life's token, or a stopped marker)."""
        async with self._talk():
            current = await self.redis.get(self.heartbeat_key(self.consumer))
        return None if current is None else _s(current)

    async def stop_beat(self, token: str, keep_ms: int) -> None:
        """On a clean exit: our entries become reclaimable at once, and say so."""
        async with self._talk():
            await self._stop_beat(keys=[self.heartbeat_key(self.consumer)],
                                  args=[token, keep_ms])

    async def check_restart(self) -> bool:
        """Did Redis restart since we last asked (its run_id changed)? Then it may have lost
        the last second of writes (AOF everysec) or everything: treat it as a data loss and as
        an outage (owners must beat again before anyone is judged dead)."""
        async with self._talk():
            info = await self.redis.info("server")
        run_id = str(info.get("run_id", ""))
        restarted = self._run_id is not None and run_id != self._run_id
        self._run_id = run_id
        if restarted:
            self._last_error = time.monotonic()
            self.data_lost.set()
        return restarted

    # --- reading ----------------------------------------------------------------------------

    async def read(self, count: int, block_ms: int) -> list[Message]:
        """New entries for this consumer (id `>`), at most `count`."""
        async with self._talk():
            resp: Any = await self.redis.xreadgroup(self.group, self.consumer,
                                                    {self.stream: ">"}, count=count,
                                                    block=block_ms)
        return [Message(_s(mid), _decode(f), self) for _, entries in resp or []
                for mid, f in entries]

    async def adopt(self, min_idle_ms: int, running: set[str], count: int) -> list[Message]:
        """Entries this consumer name holds but is not running: our previous life's work after
        a restart under the same WORKER_ID, a message whose claim reply was lost, or one set
        aside until its job ends. Re-claimed to ourselves (which counts a delivery)."""
        async with self._talk():
            rows = await self.redis.xpending_range(self.stream, self.group, min="-", max="+",
                                                   count=1000, consumername=self.consumer,
                                                   idle=min_idle_ms)
            ids = [_s(r["message_id"]) for r in rows if _s(r["message_id"]) not in running]
            ids = ids[:count]
            if not ids:
                return []
            got: Any = await self.redis.xclaim(self.stream, self.group, self.consumer,
                                               min_idle_ms, _any(ids))
        by_id = {_s(mid): f for mid, f in got if f is not None}
        gone = [m for m in ids if m not in by_id]
        if gone:  # deleted from the stream while pending: nothing left to do
            await self.ack(gone)
        counts = {_s(r["message_id"]): int(r["times_delivered"]) + 1 for r in rows}
        return [Message(m, _decode(f), self, reclaimed=True, deliveries=counts.get(m, 1))
                for m, f in by_id.items()]

    async def reclaim(self, min_idle_ms: int, count: int, scan: int = 200) -> list[Message]:
        """Take over entries whose owner has no heartbeat (see the module docstring)."""
        async with self._talk():
            cursor, claimed = await self._reclaim(
                keys=[self.stream],
                args=[self.group, self.consumer, self.heartbeat_prefix, self._cursor, scan,
                      min_idle_ms, count])
        self._cursor = _s(cursor)
        return [Message(_s(mid), _decode(f), self, reclaimed=True, deliveries=int(n))
                for mid, f, n in claimed]

    async def renew(self, message_ids: list[str]) -> dict[str, str]:
        """Reset the idle time of the ids we still own. Returns the others: 'taken' (another
        replica owns it now: stop) or 'gone' (Redis lost it: finish the job anyway)."""
        if not message_ids:
            return {}
        async with self._talk():
            lost = await self._renew(keys=[self.stream],
                                     args=[self.group, self.consumer, *message_ids])
        return {_s(m): _s(why) for m, why in lost}

    # --- settling ---------------------------------------------------------------------------

    async def ack(self, message_ids: list[str]) -> int:
        if not message_ids:
            return 0
        async with self._talk():
            return int(await self.redis.xack(self.stream, self.group, *message_ids))

    async def ack_batched(self, message_id: str) -> None:
        """XACK, sharing one round trip with the acks of other jobs finishing at the same time.
        Returns once the XACK that carried this id has succeeded (raises if it failed)."""
        waiter = asyncio.get_running_loop().create_future()
        self._ack_ids.append(message_id)
        self._ack_waiters.append(waiter)
        if self._ack_flusher is None or self._ack_flusher.done():
            self._ack_flusher = asyncio.create_task(self._flush_acks())
        await waiter

    async def _flush_acks(self) -> None:
        # While one XACK is in flight, later ids gather and go in the next one: no added
        # latency when idle, few round trips under load.
        while self._ack_ids:
            ids, waiters = self._ack_ids, self._ack_waiters
            self._ack_ids, self._ack_waiters = [], []
            try:
                await self.ack(ids)
            except Exception as exc:  # each waiter sees the error and retries on its own
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                continue
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def dead_letter(self, message: Message, reason: str) -> None:
        fields: list[str] = []
        for k, v in message.fields.items():
            fields += [k, v]
        fields += ["original_id", message.message_id, "reason", reason,
                   "deliveries", str(message.deliveries), "consumer", self.consumer]
        marker = f"safeurl:dl:{{{self.stream}}}:{self.group}:{message.message_id}"
        async with self._talk():
            await self._dead_letter(keys=[self.stream, self.dead_letter_stream, marker],
                                    args=[self.group, message.message_id,
                                          self.dead_letter_maxlen, *fields])

    async def hand_back(self, lease_timeout_ms: int) -> int:
        """On shutdown: mark every entry we still hold idle for a whole lease, so that (with our
        heartbeat cleared) another replica takes them over at once."""
        async with self._talk():
            rows = await self.redis.xpending_range(self.stream, self.group, min="-", max="+",
                                                   count=10_000, consumername=self.consumer)
            ids = [_s(r["message_id"]) for r in rows]
            for i in range(0, len(ids), 500):
                await self.redis.xclaim(self.stream, self.group, self.consumer, 0,
                                        _any(ids[i:i + 500]), idle=lease_timeout_ms + 1,
                                        justid=True)
        return len(ids)

    # --- the dead-letter stream, for operators (ops.py: list, replay, purge, prune) ---------

    async def dead_letters(self, after: str | None = None, count: int | None = None
                           ) -> list[tuple[str, dict[str, str]]]:
        """Dead letters oldest first: `count` of them after the entry id `after`, or (count
        None) all of them, a page at a time (the stream is bounded by DEAD_LETTER_MAXLEN)."""
        entries: list[tuple[str, dict[str, str]]] = []
        start, page = (f"({after}" if after else "-"), count or 1000
        while True:
            async with self._talk():
                batch: Any = await self.redis.xrange(self.dead_letter_stream, min=start,
                                                     count=page)
            entries += [(_s(eid), _decode(fields)) for eid, fields in batch]
            if count is not None or len(batch) < page:
                return entries
            start = f"({entries[-1][0]}"  # exclusive: after the last entry read

    async def dead_letter_entry(self, entry_id: str) -> dict[str, str] | None:
        async with self._talk():
            found: Any = await self.redis.xrange(self.dead_letter_stream, min=entry_id,
                                                 max=entry_id)
        return _decode(found[0][1]) if found else None

    async def delete_dead_letters(self, entry_ids: list[str]) -> int:
        if not entry_ids:
            return 0
        async with self._talk():
            return int(await self.redis.xdel(self.dead_letter_stream, *entry_ids))

    async def purge_dead_letters(self) -> int:
        """Delete the whole dead-letter stream; returns how many entries it held."""
        async with self._talk():
            n = await self.redis.xlen(self.dead_letter_stream)
            await self.redis.delete(self.dead_letter_stream)
        return int(n)

    # --- the janitor's view of the stream -----------------------------------------------------

    async def enqueue(self, job_id: uuid.UUID) -> None:
        """XADD a job id, as the API service does."""
        async with self._talk():
            await self.redis.xadd(self.stream, {"job_id": str(job_id)})

    async def job_ids_in_stream(self, limit: int = 20_000) -> tuple[set[uuid.UUID], bool]:
        """Job ids that still have an entry: pending in the group or not yet delivered.
        The flag says whether the answer is complete (False past `limit` entries)."""
        async with self._talk():
            if not await self.redis.exists(self.stream):
                return set(), True
            # The delivery cursor first: an entry delivered while we look is then still found,
            # in the tail if not yet in the pending list.
            last = await self._last_delivered()
            pend = await self.redis.xpending_range(self.stream, self.group, min="-", max="+",
                                                   count=limit)
            pipe = self.redis.pipeline(transaction=False)
            for e in pend:
                pipe.xrange(self.stream, min=e["message_id"], max=e["message_id"], count=1)
            found = list(await pipe.execute()) if pend else []
            tail: Any = await self.redis.xrange(self.stream, min=f"({last}", max="+",
                                                count=limit)
        ids: set[uuid.UUID] = set()
        for entries in [*found, tail]:
            for _, fields in entries:
                with contextlib.suppress(ValueError, KeyError, AttributeError):
                    ids.add(uuid.UUID(_s(fields[b"job_id"])))
        return ids, len(pend) < limit and len(tail) < limit

    async def _last_delivered(self) -> str:
        for g in await self.redis.xinfo_groups(self.stream):
            if _s(g["name"]) == self.group:
                return _s(g["last-delivered-id"])
        return "0-0"

    async def remove_idle_consumers(self, min_idle_ms: int) -> int:
        """Forget consumers that hold nothing, have no heartbeat and were idle a long time."""
        removed = 0
        async with self._talk():
            if not await self.redis.exists(self.stream):
                return 0
            for c in await self.redis.xinfo_consumers(self.stream, self.group):
                name = _s(c["name"])
                beat = await self.redis.get(self.heartbeat_key(name))
                if (int(c["pending"]) == 0 and int(c["idle"]) >= min_idle_ms
                        and name != self.consumer
                        and (beat is None or _s(beat).startswith(STOPPED))):
                    removed += int(await self.redis.xgroup_delconsumer(self.stream, self.group,
                                                                       name) == 0)
        return removed

    async def trim(self) -> int:
        """Drop acknowledged entries: trim below the oldest entry that is still pending or not
        yet delivered (MINID), so trimming can never remove work."""
        async with self._talk():
            if not await self.redis.exists(self.stream):
                return 0
            groups = await self.redis.xinfo_groups(self.stream)
            floor: str | None = None
            for g in groups:
                candidates = [_s(g["last-delivered-id"])]
                if int(g["pending"]):
                    summary = await self.redis.xpending(self.stream, _s(g["name"]))
                    candidates.append(_s(summary["min"]))
                low = min(candidates, key=_id_key)
                floor = low if floor is None else min(floor, low, key=_id_key)
            if floor is None:
                return 0
            # last-delivered-id itself was delivered (and may be acked): keep it, it is cheap.
            return int(await self.redis.xtrim(self.stream, minid=floor, approximate=False))


def _any(ids: list[str]) -> list[Any]:
    return list(ids)  # redis-py's stubs want a list of a wider element type


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _id_key(mid: str) -> tuple[int, int]:
    ms, _, seq = mid.partition("-")
    return int(ms), int(seq or 0)
