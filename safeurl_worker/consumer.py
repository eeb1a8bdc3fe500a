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

Queues (docs/contract.md, "Lanes, tenants and politeness"): each lane is a stream (`default` is
SCAN_STREAM itself, lane L is `SCAN_STREAM:L`), and a tenant's jobs in a lane have a queue of
their own (`<lane stream>:t:<tenant>`, listed in a registry set), all with the same group and the
same contract. `read` takes one entry at a time by smooth weighted round-robin over the lanes
and round-robin over a lane's queues, so a busy lane or a tenant with a huge backlog gets its
share and no more; a tenant at its in-flight quota (its queue's pending count) is skipped. A
message carries its queue, and every per-message call goes to that queue's stream.

The Lua scripts touch the heartbeat keys by name: they share the stream's hash tag, so all keys
live in one slot (on Redis Cluster, give SCAN_STREAM a hash tag: `{scan-jobs}`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
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

# Take up to ARGV[3] entries, one at a time: smooth weighted round-robin over the lanes, then
# round-robin over the lane's queues from its cursor. A queue is skipped once empty, or once
# its tenant's pending count reaches its cap. A missing group is created (a new tenant queue;
# for a lane stream that is a loss, reported). KEYS: the queues, lane by lane, the lane stream
# first, then the registry's doorbell stream. ARGV: group, consumer, count, nlanes, per lane
# {weight, current, cursor}, per queue {lane index, tenant index (0: none), the tenant's cap}.
# A tenant's in flight is the sum of its queues' pending counts, over every lane. Returns
# {entries {queue, id, fields}, currents, cursors, lost lanes, waits {key index, last id},
# capped} - waits only when nothing was read: where to block for new entries (the doorbell
# rings when a tenant queue is added); capped: some queue with entries was skipped for its cap.
_READ = """
local group, consumer, want, nl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local nq = #KEYS - 1  -- KEYS[#KEYS]: the doorbell
local lanes, a = {}, 5
for l = 1, nl do
  lanes[l] = {w = tonumber(ARGV[a]), cur = tonumber(ARGV[a + 1]),
              cursor = tonumber(ARGV[a + 2]), qs = {}, done = false}
  a = a + 3
end
local caps, tenant, first = {}, {}, {}
for q = 1, nq do
  local l = tonumber(ARGV[a]); tenant[q] = tonumber(ARGV[a + 1]); caps[q] = tonumber(ARGV[a + 2])
  a = a + 3
  if #lanes[l].qs == 0 then first[q] = true end
  table.insert(lanes[l].qs, q)
end
local done, used, lost, capped = {}, {}, {}, 0

local function in_flight(t)
  if used[t] == nil then
    local n = 0
    for q = 1, nq do
      if tenant[q] == t then
        local p = redis.pcall('XPENDING', KEYS[q], group)
        if type(p) == 'table' and not p.err then n = n + tonumber(p[1]) end
      end
    end
    used[t] = n
  end
  return used[t]
end

local function xread(q)
  return redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', KEYS[q], '>')
end

local function read_one(q)
  local t = tenant[q]
  if caps[q] > 0 and t > 0 and in_flight(t) >= caps[q] then
    done[q] = 'cap'
    if redis.call('EXISTS', KEYS[q]) == 1 then capped = 1 end
    return nil
  end
  local r = xread(q)
  if type(r) == 'table' and r.err then
    if not string.find(r.err, 'NOGROUP') then error(r.err) end
    if first[q] then
      redis.call('XGROUP', 'CREATE', KEYS[q], group, '0', 'MKSTREAM')
      lost[#lost + 1] = KEYS[q]
    elseif redis.call('EXISTS', KEYS[q]) == 1 then
      redis.call('XGROUP', 'CREATE', KEYS[q], group, '0')
    else
      done[q] = 'gone'; return nil
    end
    r = xread(q)
  end
  if not r then done[q] = 'empty'; return nil end
  if t > 0 and used[t] ~= nil then used[t] = used[t] + 1 end
  return r[1][2][1]
end

local out = {}
while #out < want do
  local total, best = 0, nil
  for l = 1, nl do
    local L = lanes[l]
    if not L.done then
      total = total + L.w; L.cur = L.cur + L.w
      if best == nil or L.cur > lanes[best].cur then best = l end
    end
  end
  if best == nil then break end
  local L = lanes[best]
  L.cur = L.cur - total
  local entry = nil
  for i = 0, #L.qs - 1 do
    local k = (L.cursor + i) % #L.qs
    local q = L.qs[k + 1]
    if not done[q] then
      entry = read_one(q)
      if entry then
        L.cursor = (k + 1) % #L.qs
        out[#out + 1] = {q, entry[1], entry[2]}
        break
      end
    end
  end
  if not entry then  -- nothing here: undo the lane's turn and leave it out from now on
    for l = 1, nl do if not lanes[l].done then lanes[l].cur = lanes[l].cur - lanes[l].w end end
    L.cur = L.cur + total
    L.done = true
  end
end
local curs, cursors, waits = {}, {}, {}
for l = 1, nl do curs[l] = lanes[l].cur; cursors[l] = lanes[l].cursor end
if #out == 0 then
  for q = 1, #KEYS do
    if done[q] == 'empty' or q == #KEYS then
      local last = redis.call('XREVRANGE', KEYS[q], '+', '-', 'COUNT', 1)
      waits[#waits + 1] = {q, #last > 0 and last[1][1] or '0-0'}
    end
  end
end
return {out, curs, cursors, lost, waits, capped}
"""

# A tenant queue that holds nothing (no pending, nothing undelivered) is removed with its
# registry entry, atomically: an enqueue (`_ENQUEUE`) comes before or after.
_DROP_IDLE_QUEUE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
  if not ok then return 0 end
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  for _, g in ipairs(groups) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if tonumber(f['pending']) > 0 then return 0 end
    if #last > 0 and f['last-delivered-id'] ~= last[1][1] then return 0 end
  end
  if #groups == 0 and #last > 0 then return 0 end
  redis.call('DEL', KEYS[1])
end
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""
# XADD to a tenant queue and register it in one step, so the janitor never drops a queue
# between the two; a queue new to the registry rings the doorbell, waking blocked readers.
_ENQUEUE = """
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100, '*', 'queue', KEYS[1])
end
return id
"""
DEFAULT_LANE = "default"
_REFRESH_S = 1.0  # how stale this replica's list of tenant queues may be


def hash_tag(stream: str) -> str:
    """The Redis Cluster hash tag of every key derived from `stream`: the tag the name carries
    (`{scan-jobs}`, whose lanes `{scan-jobs}:bulk` share it), else the whole name in braces."""
    start = stream.find("{")
    end = stream.find("}", start + 1)
    return stream[start:end + 1] if start >= 0 and end > start + 1 else f"{{{stream}}}"


def lane_stream(base: str, lane: str) -> str:
    return base if lane == DEFAULT_LANE else f"{base}:{lane}"


@dataclasses.dataclass(frozen=True, slots=True)
class Queue:
    """A stream the group reads: a lane's own stream (tenant None), or a tenant's in a lane."""

    stream: str
    lane: str = DEFAULT_LANE
    tenant: str | None = None

    @staticmethod
    def of(base: str, lane: str | None, tenant: str | None) -> Queue:
        lane = lane or DEFAULT_LANE
        stream = lane_stream(base, lane)
        return Queue(f"{stream}:t:{tenant}" if tenant else stream, lane, tenant or None)


@dataclasses.dataclass(slots=True)
class Message:
    """One stream entry handed to this worker; it carries its own ack."""

    message_id: str
    fields: dict[str, str]
    consumer: Consumer
    reclaimed: bool = False  # taken over from a dead owner, or our own previous life
    deliveries: int = 1
    read_at: float = dataclasses.field(default_factory=time.monotonic)
    queue: Queue | None = None  # None: the consumer's own stream (the default lane)

    @property
    def stream(self) -> str:
        return self.queue.stream if self.queue else self.consumer.stream

    @property
    def key(self) -> str:
        """Unique across queues (entry ids are only unique within a stream); a plain
        SCAN_STREAM entry's key is its id."""
        return _key(self.stream, self.message_id, self.consumer.stream)

    async def ack(self) -> None:
        await self.consumer.ack_batched(self)

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


class QueueGone(Exception):
    """A tenant queue removed while idle (nothing pending, nothing undelivered)."""


class Consumer:
    def __init__(self, client: redis.Redis, stream: str, group: str, consumer: str,
                 dead_letter_stream: str, dead_letter_maxlen: int = 100_000,
                 lanes: dict[str, int] | None = None,
                 max_in_flight: Callable[[str], int] | None = None) -> None:
        self.redis = client
        self.stream = stream
        self.lanes = lanes or {DEFAULT_LANE: 1}  # lane -> weight, highest priority first
        self.max_in_flight = max_in_flight or (lambda tenant: 0)  # a tenant's cap; 0: none
        tag = hash_tag(stream)
        self.registry = f"safeurl:queues:{tag}"  # "<lane> <tenant>" of tenant queues
        self.doorbell = f"{self.registry}:new"  # an entry per queue added: blocked reads wake
        self.group = group
        self.consumer = consumer
        self.dead_letter_stream = dead_letter_stream
        self.dead_letter_maxlen = dead_letter_maxlen
        self.heartbeat_prefix = f"safeurl:hb:{hash_tag(stream)}:{group}:"
        self.data_lost = asyncio.Event()  # set when the stream or group had to be recreated
        self._last_error = time.monotonic()  # a new client has not yet proven Redis steady
        self._cursors: dict[str, str] = {}  # reclaim's place in each queue's PEL
        self._tenant_queues: list[Queue] = []
        self._refreshed = -_REFRESH_S
        self._bell_seen = "0-0"  # the doorbell's last entry when the registry was last read
        self._wrr: dict[str, tuple[int, int]] = {}  # lane -> (current weight, queue cursor)
        self._ack_ids: list[str] = []
        self._ack_waiters: list[asyncio.Future[None]] = []
        self._ack_flusher: asyncio.Task[None] | None = None
        self._renew = client.register_script(_RENEW)
        self._reclaim = client.register_script(_RECLAIM)
        self._read = client.register_script(_READ)
        self._enqueue = client.register_script(_ENQUEUE)
        self._drop_idle = client.register_script(_DROP_IDLE_QUEUE)
        self._dead_letter = client.register_script(_DEAD_LETTER)
        self._stop_beat = client.register_script(_STOP_BEAT)
        self._run_id: str | None = None

    # --- health ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _talk(self, queue: Queue | None = None) -> AsyncIterator[None]:
        """Every call goes through here: an outage is remembered (see `steady_for`), and a
        missing group is recreated before the error is passed on to be retried. A tenant
        queue without its group was removed while idle: `QueueGone`."""
        try:
            yield
        except ResponseError as exc:
            if str(exc).startswith("NOGROUP") and queue is not None and queue.tenant:
                raise QueueGone(queue.stream) from exc
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
        """Create the group (and the stream) of every lane if missing. Id 0: entries XADDed
        before any worker existed are delivered too (entries already done are recognised and
        acked). Tenant queues get theirs when first read."""
        for lane in self.lanes:
            stream = lane_stream(self.stream, lane)
            try:
                await self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            # Visible in XINFO CONSUMERS from the start, not only after a first delivery.
            await self.redis.xgroup_createconsumer(stream, self.group, self.consumer)

    # --- queues -------------------------------------------------------------------------------

    async def queues(self, fresh: bool = False) -> list[Queue]:
        """Every queue, lane by lane in priority order, the lane's own stream first. The
        tenant queues come from the registry, re-read at most every second (or when `fresh`)."""
        if fresh or time.monotonic() - self._refreshed >= _REFRESH_S:
            async with self._talk():
                pipe = self.redis.pipeline(transaction=False)
                pipe.xrevrange(self.doorbell, count=1)  # before the set: a ring after it
                pipe.smembers(self.registry)  # is a queue this read may not list yet
                bell, members = await pipe.execute()
            self._bell_seen = _s(bell[0][0]) if bell else "0-0"
            found = []
            for m in sorted(_s(x) for x in members):
                lane, _, tenant = m.partition(" ")
                if lane in self.lanes and tenant:  # a lane this replica does not read: skip
                    found.append(Queue.of(self.stream, lane, tenant))
            self._tenant_queues, self._refreshed = found, time.monotonic()
        return [q for lane in self.lanes
                for q in [Queue.of(self.stream, lane, None),
                          *(t for t in self._tenant_queues if t.lane == lane)]]

    def _queue_of(self, stream: str) -> Queue | None:
        for lane in self.lanes:
            if stream == lane_stream(self.stream, lane):
                return Queue(stream, lane)
        return next((q for q in self._tenant_queues if q.stream == stream), None)

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
        """New entries for this consumer (id `>`), at most `count`, in the lanes' weighted
        order (see the module docstring). With none ready, waits up to `block_ms` for one."""
        got, waits, capped = await self._read_once(count, await self.queues())
        if got or block_ms <= 0:
            return got
        # Block on every queue past its last entry, and on the doorbell past what the last
        # registry read saw: woken by the next XADD, or a new tenant queue. An ack that frees
        # a capped tenant wakes nobody: then look again shortly.
        waits[self.doorbell] = self._bell_seen
        async with self._talk():
            await self.redis.xread(waits, count=1,  # type: ignore[arg-type]
                                   block=min(block_ms, 250) if capped else block_ms)
        got, _, _ = await self._read_once(count, await self.queues(fresh=True))
        return got

    async def _read_once(self, count: int, queues: list[Queue]
                         ) -> tuple[list[Message], dict[str, str], bool]:
        lanes = list(self.lanes)
        args: list[Any] = [self.group, self.consumer, count, len(lanes)]
        for lane in lanes:
            args += [self.lanes[lane], *self._wrr.get(lane, (0, 0))]
        tenants = {t: i for i, t in enumerate(sorted({q.tenant for q in queues if q.tenant}), 1)}
        for q in queues:
            args += [lanes.index(q.lane) + 1, tenants.get(q.tenant or "", 0),
                     self.max_in_flight(q.tenant) if q.tenant else 0]
        keys = [q.stream for q in queues] + [self.doorbell]
        async with self._talk():
            out, currents, cursors, lost, waits, capped = await self._read(keys=keys, args=args)
        # Bounded: a lane left out for long must not build up an unbounded credit.
        self._wrr = {lane: (max(-10**6, min(10**6, int(c))), int(k))
                     for lane, c, k in zip(lanes, currents, cursors, strict=True)}
        if lost:  # a lane's group was gone (recreated by the script): as for NOGROUP in _talk
            self._last_error = time.monotonic()
            self.data_lost.set()
        got = [Message(_s(mid), _decode(f), self, queue=queues[int(qi) - 1])
               for qi, mid, f in out]
        return got, {keys[int(qi) - 1]: _s(last) for qi, last in waits}, bool(capped)

    async def adopt(self, min_idle_ms: int, running: set[str], count: int) -> list[Message]:
        """Entries this consumer name holds but is not running: our previous life's work after
        a restart under the same WORKER_ID, a message whose claim reply was lost, or one set
        aside until its job ends. Re-claimed to ourselves (which counts a delivery).
        `running`: the keys (`Message.key`) of the messages running here."""
        adopted: list[Message] = []
        for q in await self.queues():
            if len(adopted) >= count:
                break
            with contextlib.suppress(QueueGone):
                adopted += await self._adopt_from(q, min_idle_ms, running,
                                                  count - len(adopted))
        return adopted

    async def _adopt_from(self, q: Queue, min_idle_ms: int, running: set[str], count: int
                          ) -> list[Message]:
        async with self._talk(q):
            rows = await self.redis.xpending_range(q.stream, self.group, min="-", max="+",
                                                   count=1000, consumername=self.consumer,
                                                   idle=min_idle_ms)
            ids = [_s(r["message_id"]) for r in rows
                   if _key(q.stream, _s(r["message_id"]), self.stream) not in running]
            ids = ids[:count]
            if not ids:
                return []
            got: Any = await self.redis.xclaim(q.stream, self.group, self.consumer,
                                               min_idle_ms, _any(ids))
        by_id = {_s(mid): f for mid, f in got if f is not None}
        # Deleted from the stream while pending (Redis 6 answers them with no fields; 7 drops
        # them from the PEL itself): nothing left to do. An id missing from the answer was
        # claimed by another replica meanwhile: not ours to ack.
        gone = [_s(mid) for mid, f in got if f is None and mid is not None]
        if gone:
            await self.ack(gone, q.stream)
        counts = {_s(r["message_id"]): int(r["times_delivered"]) + 1 for r in rows}
        return [Message(m, _decode(f), self, reclaimed=True, deliveries=counts.get(m, 1),
                        queue=q) for m, f in by_id.items()]

    async def reclaim(self, min_idle_ms: int, count: int, scan: int = 200) -> list[Message]:
        """Take over entries whose owner has no heartbeat (see the module docstring), from
        every queue in priority order, at most `count`."""
        taken: list[Message] = []
        for q in await self.queues():
            if len(taken) >= count:
                break
            try:
                async with self._talk(q):
                    cursor, claimed = await self._reclaim(
                        keys=[q.stream],
                        args=[self.group, self.consumer, self.heartbeat_prefix,
                              self._cursors.get(q.stream, "-"), scan, min_idle_ms,
                              count - len(taken)])
            except QueueGone:
                continue
            self._cursors[q.stream] = _s(cursor)
            taken += [Message(_s(mid), _decode(f), self, reclaimed=True, deliveries=int(n),
                              queue=q) for mid, f, n in claimed]
        return taken

    async def renew(self, keys: list[str]) -> dict[str, str]:
        """Reset the idle time of the messages (by `Message.key`) we still own. Returns the
        others: 'taken' (another replica owns it now: stop) or 'gone' (Redis lost it: finish
        the job anyway). One round trip for all queues."""
        by_stream = _by_stream(keys, self.stream)
        if not by_stream:
            return {}
        lanes = {lane_stream(self.stream, lane) for lane in self.lanes}
        out: dict[str, str] = {}
        async with self._talk():
            pipe = self.redis.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                await self._renew(keys=[stream], args=[self.group, self.consumer, *ids],
                                  client=pipe)
            replies = await pipe.execute(raise_on_error=False)
            for (stream, ids), reply in zip(by_stream.items(), replies, strict=True):
                if isinstance(reply, Exception):
                    if str(reply).startswith("NOGROUP") and stream not in lanes:
                        # A tenant queue lost with its entries: as for an entry Redis lost.
                        out |= {_key(stream, m, self.stream): "gone" for m in ids}
                        continue
                    raise reply  # a lane's group: _talk recreates it and reports the loss
                out |= {_key(stream, _s(m), self.stream): _s(why) for m, why in reply}
        return out

    # --- settling ---------------------------------------------------------------------------

    async def ack(self, message_ids: list[str], stream: str | None = None) -> int:
        if not message_ids:
            return 0
        async with self._talk():
            return int(await self.redis.xack(stream or self.stream, self.group, *message_ids))

    async def ack_batched(self, message: Message) -> None:
        """XACK, sharing one round trip with the acks of other jobs finishing at the same time.
        Returns once the XACK that carried this message has succeeded (raises if it failed)."""
        waiter = asyncio.get_running_loop().create_future()
        self._ack_ids.append(message.key)
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
                await self._ack_keys(ids)
            except Exception as exc:  # each waiter sees the error and retries on its own
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                continue
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def _ack_keys(self, keys: list[str]) -> None:
        by_stream = _by_stream(keys, self.stream)
        if len(by_stream) == 1:
            [(stream, ids)] = by_stream.items()
            await self.ack(ids, stream)
            return
        async with self._talk():
            pipe = self.redis.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                pipe.xack(stream, self.group, *ids)
            await pipe.execute()

    async def dead_letter(self, message: Message, reason: str) -> None:
        fields: list[str] = []
        for k, v in message.fields.items():
            fields += [k, v]
        fields += ["original_id", message.message_id, "reason", reason,
                   "deliveries", str(message.deliveries), "consumer", self.consumer]
        if message.stream != self.stream:
            fields += ["queue", message.stream]
        marker = f"safeurl:dl:{hash_tag(self.stream)}:{self.group}:{message.key}"
        async with self._talk():
            await self._dead_letter(keys=[message.stream, self.dead_letter_stream, marker],
                                    args=[self.group, message.message_id,
                                          self.dead_letter_maxlen, *fields])

    async def hand_back(self, lease_timeout_ms: int) -> int:
        """On shutdown: mark every entry we still hold idle for a whole lease, so that (with our
        heartbeat cleared) another replica takes them over at once."""
        held = 0
        for q in await self.queues(fresh=True):
            with contextlib.suppress(QueueGone):
                async with self._talk(q):
                    rows = await self.redis.xpending_range(q.stream, self.group, min="-",
                                                           max="+", count=10_000,
                                                           consumername=self.consumer)
                    ids = [_s(r["message_id"]) for r in rows]
                    for i in range(0, len(ids), 500):
                        await self.redis.xclaim(q.stream, self.group, self.consumer, 0,
                                                _any(ids[i:i + 500]),
                                                idle=lease_timeout_ms + 1, justid=True)
                held += len(ids)
        return held

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

    async def enqueue(self, job_id: uuid.UUID, *, lane: str | None = None,
                      tenant: str | None = None, domain: str | None = None) -> None:
        """XADD a job id, as the API service does: to its lane's stream, or its tenant's queue
        in that lane (registered in the same script, see `_ENQUEUE`). `domain`
        (politeness.target_domain of the URL) saves the worker a look at the row; the other
        fields are for people reading the stream."""
        lane = lane or DEFAULT_LANE
        if lane not in self.lanes:
            raise ValueError(f"unknown lane {lane!r}; the lanes are {', '.join(self.lanes)}")
        q = Queue.of(self.stream, lane, tenant)
        fields = {"job_id": str(job_id)}
        fields |= {k: v for k, v in (("lane", lane if lane != DEFAULT_LANE else None),
                                     ("tenant", tenant), ("domain", domain)) if v}
        async with self._talk():
            if q.tenant is None:
                await self.redis.xadd(q.stream, fields)  # type: ignore[arg-type]
                return
            flat = [x for kv in fields.items() for x in kv]
            await self._enqueue(keys=[q.stream, self.registry, self.doorbell],
                                args=[f"{lane} {tenant}", *flat])

    async def job_ids_in_stream(self, limit: int = 20_000) -> tuple[set[uuid.UUID], bool]:
        """Job ids that still have an entry in some queue: pending in the group or not yet
        delivered. The flag says whether the answer is complete (False past `limit` entries
        in a queue)."""
        ids: set[uuid.UUID] = set()
        complete = True
        for q in await self.queues(fresh=True):
            with contextlib.suppress(QueueGone):
                found, whole = await self._job_ids_in(q, limit)
                ids |= found
                complete = complete and whole
        return ids, complete

    async def _job_ids_in(self, q: Queue, limit: int) -> tuple[set[uuid.UUID], bool]:
        async with self._talk(q):
            if not await self.redis.exists(q.stream):
                return set(), True
            # The delivery cursor first: an entry delivered while we look is then still found,
            # in the tail if not yet in the pending list.
            last = await self._last_delivered(q.stream)
            # A new tenant queue has no group until first read: all of it is undelivered.
            pend = await self.redis.xpending_range(q.stream, self.group, min="-", max="+",
                                                   count=limit) if last else []
            last = last or "0-0"
            pipe = self.redis.pipeline(transaction=False)
            for e in pend:
                pipe.xrange(q.stream, min=e["message_id"], max=e["message_id"], count=1)
            found = list(await pipe.execute()) if pend else []
            tail: Any = await self.redis.xrange(q.stream, min=f"({last}", max="+",
                                                count=limit)
        ids: set[uuid.UUID] = set()
        for entries in [*found, tail]:
            for _, fields in entries:
                with contextlib.suppress(ValueError, KeyError, AttributeError):
                    ids.add(uuid.UUID(_s(fields[b"job_id"])))
        return ids, len(pend) < limit and len(tail) < limit

    async def _last_delivered(self, stream: str) -> str:
        """The group's delivery cursor in `stream`; "" if the group does not exist."""
        for g in await self.redis.xinfo_groups(stream):
            if _s(g["name"]) == self.group:
                return _s(g["last-delivered-id"])
        return ""

    async def depths(self) -> list[dict[str, Any]]:
        """Per queue: lane, tenant, `waiting` (not yet delivered; None when Redis cannot say,
        after an XDEL of an undelivered entry) and `pending` (delivered, not acked: running,
        or waiting for its domain)."""
        queues = await self.queues(fresh=True)
        async with self._talk():
            pipe = self.redis.pipeline(transaction=False)
            for q in queues:
                pipe.xinfo_groups(q.stream)
                pipe.xlen(q.stream)
            replies = await pipe.execute(raise_on_error=False)
        rows = []
        for q, groups, length in zip(queues, replies[::2], replies[1::2], strict=True):
            g = next((g for g in groups if _s(g["name"]) == self.group), None) \
                if isinstance(groups, list) else None
            waiting = (None if g.get("lag") is None else int(g["lag"])) if g else \
                int(length) if isinstance(length, int) else 0  # no group yet: all of it
            rows.append({"lane": q.lane, "tenant": q.tenant, "stream": q.stream,
                         "waiting": waiting, "pending": int(g["pending"]) if g else 0})
        return rows

    async def remove_idle_consumers(self, min_idle_ms: int) -> int:
        """Forget consumers that hold nothing, have no heartbeat and were idle a long time;
        and tenant queues that hold nothing (see `_DROP_IDLE_QUEUE`)."""
        removed = 0
        for q in await self.queues(fresh=True):
            if q.tenant:
                async with self._talk():
                    if await self._drop_idle(keys=[q.stream, self.registry],
                                             args=[f"{q.lane} {q.tenant}"]):
                        continue
            async with self._talk():
                if not await self.redis.exists(q.stream) or \
                        not await self._last_delivered(q.stream):
                    continue  # gone, or a new tenant queue nobody has read yet
                for c in await self.redis.xinfo_consumers(q.stream, self.group):
                    name = _s(c["name"])
                    beat = await self.redis.get(self.heartbeat_key(name))
                    if (int(c["pending"]) == 0 and int(c["idle"]) >= min_idle_ms
                            and name != self.consumer
                            and (beat is None or _s(beat).startswith(STOPPED))):
                        removed += int(await self.redis.xgroup_delconsumer(
                            q.stream, self.group, name) == 0)
        return removed

    async def trim(self) -> int:
        """Drop acknowledged entries: trim each queue below its oldest entry that is still
        pending or not yet delivered (MINID), so trimming can never remove work."""
        trimmed = 0
        for q in await self.queues(fresh=True):
            with contextlib.suppress(QueueGone):
                trimmed += await self._trim(q)
        return trimmed

    async def _trim(self, q: Queue) -> int:
        async with self._talk(q):
            if not await self.redis.exists(q.stream):
                return 0
            groups = await self.redis.xinfo_groups(q.stream)
            floor: str | None = None
            for g in groups:
                candidates = [_s(g["last-delivered-id"])]
                if int(g["pending"]):
                    summary = await self.redis.xpending(q.stream, _s(g["name"]))
                    candidates.append(_s(summary["min"]))
                low = min(candidates, key=_id_key)
                floor = low if floor is None else min(floor, low, key=_id_key)
            if floor is None:
                return 0
            # last-delivered-id itself was delivered (and may be acked): keep it, it is cheap.
            return int(await self.redis.xtrim(q.stream, minid=floor, approximate=False))


def _key(stream: str, message_id: str, base: str) -> str:
    """A message's key: its id in the base stream, `<stream> <id>` elsewhere (ids carry no
    space, so the last space splits them)."""
    return message_id if stream == base else f"{stream} {message_id}"


def _by_stream(keys: list[str], base: str) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for k in keys:
        stream, _, mid = k.rpartition(" ")
        grouped.setdefault(stream or base, []).append(mid)
    return grouped


def _any(ids: list[str]) -> list[Any]:
    return list(ids)  # redis-py's stubs want a list of a wider element type


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _id_key(mid: str) -> tuple[int, int]:
    ms, _, seq = mid.partition("-")
    return int(ms), int(seq or 0)
