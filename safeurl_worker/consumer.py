"""The stream consumer: everything this worker says to Redis about `scan-jobs`.

Reading (`read`, `read_own_pending`, `reclaim`), lease renewal, acknowledgement and dead-lettering
all live here, so the rules about message ownership are in one room:

* A message read by this consumer stays in the group's pending list (PEL) until it is acked.
* The lease is the PEL entry's idle time. `renew` resets it (XCLAIM JUSTID) for ids this consumer
  still owns; other replicas `reclaim` entries idle longer than the lease timeout (XAUTOCLAIM).
* `renew` and `ack_if_owner` check ownership and act in one Lua script: a worker whose message was
  reclaimed by another must neither steal it back nor ack it from under the new owner.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import redis.asyncio as redis
from redis.exceptions import ResponseError

_RENEW = """
local owned = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    owned[#owned + 1] = ARGV[i]
  end
end
return owned
"""

_ACK_IF_OWNER = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p > 0 and p[1][2] == ARGV[2] then
  return redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
end
return 0
"""

# Dead-letter = copy with reason + ack, atomically, so an entry is never both lost and pending.
_DEAD_LETTER = """
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """One stream entry handed to this worker."""

    message_id: str
    fields: dict[str, str]
    reclaimed: bool = False  # came back from a dead/slow owner (or our own previous life)
    deliveries: int = 1
    read_at: float = dataclasses.field(default_factory=time.monotonic)


def _decode(fields: dict[bytes, bytes] | None) -> dict[str, str]:
    if not fields:
        return {}
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}


def connect(dsn: str) -> redis.Redis:
    # health_check_interval + retry_on_timeout: a dropped connection is re-made on next use.
    return redis.Redis.from_url(dsn, health_check_interval=15, socket_keepalive=True,
                                socket_connect_timeout=5, retry_on_timeout=True)


class Consumer:
    def __init__(self, client: redis.Redis, stream: str, group: str, consumer: str,
                 dead_letter_stream: str) -> None:
        self.redis = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.dead_letter_stream = dead_letter_stream
        self._ack_ids: list[str] = []
        self._ack_waiters: list[asyncio.Future[None]] = []
        self._ack_flusher: asyncio.Task[None] | None = None
        self._renew = client.register_script(_RENEW)
        self._ack_if_owner = client.register_script(_ACK_IF_OWNER)
        self._dead_letter = client.register_script(_DEAD_LETTER)

    async def ensure_group(self) -> None:
        """Create the group (and the stream) if missing. Id 0: entries XADDed before any worker
        existed are delivered too."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, count: int, block_ms: int) -> list[Delivery]:
        """New entries for this consumer (id `>`), at most `count`."""
        resp: Any = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                                count=count, block=block_ms)
        return [Delivery(mid.decode(), _decode(f)) for _, entries in resp or []
                for mid, f in entries]

    async def read_own_pending(self, count: int = 1000) -> list[Delivery]:
        """Entries this consumer name already holds (id `0`): our previous life's work."""
        resp: Any = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: "0"},
                                                count=count)
        out = []
        for _, entries in resp or []:
            for mid, f in entries:
                if f is None:  # entry deleted from the stream while pending: nothing to do
                    await self.ack([mid.decode()])
                    continue
                out.append(Delivery(mid.decode(), _decode(f), reclaimed=True))
        return out

    async def reclaim(self, min_idle_ms: int, count: int) -> list[Delivery]:
        """Take over entries whose owner stopped renewing them (XAUTOCLAIM)."""
        resp: Any = await self.redis.xautoclaim(self.stream, self.group, self.consumer,
                                                min_idle_time=min_idle_ms, start_id="0-0",
                                                count=count)
        claimed = resp[1]
        for gone in (resp[2] if len(resp) > 2 else []):  # deleted entries: drop from the PEL
            await self.ack([gone.decode() if isinstance(gone, bytes) else str(gone)])
        out = []
        for mid, f in claimed:
            if f is None:
                continue
            mid_s = mid.decode()
            out.append(Delivery(mid_s, _decode(f), reclaimed=True,
                                deliveries=await self.delivery_count(mid_s)))
        return out

    async def delivery_count(self, message_id: str) -> int:
        rows = await self.redis.xpending_range(self.stream, self.group, min=message_id,
                                               max=message_id, count=1)
        return int(rows[0]["times_delivered"]) if rows else 0

    async def renew(self, message_ids: list[str]) -> set[str]:
        """Reset the idle time of the ids we still own; returns those ids (the rest were lost)."""
        if not message_ids:
            return set()
        owned = await self._renew(keys=[self.stream],
                                  args=[self.group, self.consumer, *message_ids])
        return {m.decode() if isinstance(m, bytes) else str(m) for m in owned}

    async def ack(self, message_ids: list[str]) -> int:
        if not message_ids:
            return 0
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

    async def ack_if_owner(self, message_id: str) -> bool:
        return bool(await self._ack_if_owner(keys=[self.stream],
                                             args=[self.group, self.consumer, message_id]))

    async def release(self, message_ids: list[str], lease_timeout_ms: int) -> None:
        """Hand entries back on shutdown: mark them idle for a whole lease so another replica
        reclaims them at once instead of waiting out the lease."""
        for mid in message_ids:
            await self.redis.xclaim(self.stream, self.group, self.consumer, 0, [mid],
                                    idle=lease_timeout_ms + 1, justid=True)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        fields: list[str] = []
        for k, v in delivery.fields.items():
            fields += [k, v]
        fields += ["original_id", delivery.message_id, "reason", reason,
                   "deliveries", str(delivery.deliveries), "consumer", self.consumer]
        await self._dead_letter(keys=[self.stream, self.dead_letter_stream],
                                args=[self.group, delivery.message_id, *fields])

    async def trim(self) -> int:
        """Drop acknowledged entries: trim below the oldest entry that is still pending or not
        yet delivered (MINID), so trimming can never remove work."""
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
        # last-delivered-id itself was delivered (and may be acked): keep it anyway, it is cheap.
        return int(await self.redis.xtrim(self.stream, minid=floor, approximate=False))


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _id_key(mid: str) -> tuple[int, int]:
    ms, _, seq = mid.partition("-")
    return int(ms), int(seq or 0)
