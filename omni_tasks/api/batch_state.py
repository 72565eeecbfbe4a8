"""The Batch API's state, all in Redis, so any API process serves any batch and a batch
outlives the process that accepted it.

- Files (`KeySpace.api_file`, `KeySpace.api_file_content`): OpenAI's file object and the
  bytes, both expiring together (`FILE_TTL_S` unless the upload says otherwise).
- Batches (`KeySpace.api_batch`): one hash of the batch object's fields. Status changes
  are compare-and-set (`transition`), so two processes never move a batch twice.
- A batch's lines (`KeySpace.api_batch_lines`), the indices still waiting
  (`KeySpace.api_batch_pending`), and the output and error lines of those that ended
  (`KeySpace.api_batch_output`, `KeySpace.api_batch_errors`); the counts are those hashes'
  sizes until the batch is final, so recording a line twice never counts it twice.
- Leases (`Lease`): the one process launching, following or finalizing a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from omni_tasks.coordination.keyspace import KeySpace

#: How long files (and batches) are kept: OpenAI's default for batch files, 30 days.
FILE_TTL_S = 30 * 86400
#: The shortest `expires_after.seconds` an upload may ask for (OpenAI's bound).
MIN_FILE_TTL_S = 3600
#: Batch hash fields kept as integers, and the statuses a batch ends in.
INT_FIELDS = (
    "created_at",
    "expires_at",
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "cancelling_at",
    "cancelled_at",
    "expired_at",
)
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "expired"})
#: How many objects a listing reads at once.
PAGE_READS = 100

# KEYS: batch hash, all batches, active batches. ARGV: id, now, ttl, fields...
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""
# KEYS: batch hash. ARGV: allowed statuses (comma separated), then field/value pairs.
_TRANSITION = """
local now = redis.call('HGET', KEYS[1], 'status')
if not now then return 0 end
for allowed in string.gmatch(ARGV[1], '[^,]+') do
  if allowed == now then
    redis.call('HSET', KEYS[1], unpack(ARGV, 2))
    return 1
  end
end
return 0
"""
# KEYS: lock. ARGV: token, then milliseconds (0: delete it).
_SET_LOCK_EXPIRY = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
"""


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def file_view(raw: dict[str, str]) -> dict[str, Any]:
    """OpenAI's file object from its hash."""
    view: dict[str, Any] = {
        "id": raw["id"],
        "object": "file",
        "bytes": int(raw.get("bytes") or 0),
        "created_at": int(raw.get("created_at") or 0),
        "filename": raw.get("filename", ""),
        "purpose": raw.get("purpose", "batch"),
        "status": "processed",
        "status_details": None,
    }
    view["expires_at"] = int(raw["expires_at"]) if raw.get("expires_at") else None
    return view


class BatchStore:
    """One process's view of the Batch API's keys (`keys`, its app's), over the hub's
    asyncio client."""

    def __init__(self, redis: Redis, keys: KeySpace) -> None:
        self.redis = redis
        self.keys = keys
        self._create = redis.register_script(_CREATE)
        self._transition = redis.register_script(_TRANSITION)
        self.set_lock_expiry = redis.register_script(_SET_LOCK_EXPIRY)

    # Files

    async def put_file(
        self,
        content: str,
        filename: str,
        purpose: str,
        ttl_s: int = FILE_TTL_S,
    ) -> dict[str, Any]:
        """Store an uploaded file under a new id."""
        now = int(time.time())
        raw = {
            "id": new_file_id(),
            "bytes": str(len(content.encode())),
            "created_at": str(now),
            "filename": filename,
            "purpose": purpose,
            "expires_at": str(now + ttl_s),
        }
        pipe = self.redis.pipeline(transaction=True)
        self.add_file(pipe, raw, content, ttl_s)
        await pipe.execute()
        return file_view(raw)

    def add_file(self, pipe: Any, raw: dict[str, str], content: str, ttl_s: int) -> None:
        """Queue a file's writes on `pipe` (with a batch's final status, in one step)."""
        pipe.hset(self.keys.api_file(raw["id"]), mapping=raw)
        pipe.expire(self.keys.api_file(raw["id"]), ttl_s)
        pipe.set(self.keys.api_file_content(raw["id"]), content, ex=ttl_s)
        pipe.zadd(self.keys.api_files(), {raw["id"]: time.time()})  # finer than created_at

    async def file(self, file_id: str) -> dict[str, Any] | None:
        raw = await self.redis.hgetall(self.keys.api_file(file_id))
        return file_view(raw) if raw else None

    async def content(self, file_id: str) -> str | None:
        return await self.redis.get(self.keys.api_file_content(file_id))

    async def delete_file(self, file_id: str) -> bool:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.api_file(file_id), self.keys.api_file_content(file_id))
        pipe.zrem(self.keys.api_files(), file_id)
        deleted, _ = await pipe.execute()
        return bool(deleted)

    async def page(
        self,
        index: str,
        read: Callable[[str], Awaitable[dict[str, Any] | None]],
        limit: int,
        after: str | None,
        order: str = "desc",
        purpose: str | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of the objects a sorted set indexes, after the id `after` (and
        whether more follow); ids whose object has expired are dropped from the index
        as they are met."""
        desc = order != "asc"
        ranged = self.redis.zrevrange if desc else self.redis.zrange
        start = 0
        if after:
            rank = await (self.redis.zrevrank if desc else self.redis.zrank)(index, after)
            start = 0 if rank is None else rank + 1
        found: list[dict[str, Any]] = []
        while len(found) <= limit:
            ids = await ranged(index, start, start + min(limit + 1, PAGE_READS) - 1)
            if not ids:
                break
            objects = await asyncio.gather(*(read(item_id) for item_id in ids))
            gone = [i for i, obj in zip(ids, objects, strict=True) if obj is None]
            if gone:
                await self.redis.zrem(index, *gone)
            start += len(ids) - len(gone)
            kept = [o for o in objects if o is not None]
            found += [o for o in kept if purpose is None or o.get("purpose") == purpose]
        return found[:limit], len(found) > limit

    # Batches

    async def create_batch(self, batch_id: str, fields: dict[str, str]) -> bool:
        """Store a new batch (False: the id exists, the batch is left as it is)."""
        flat = [item for pair in fields.items() for item in pair]
        created = await self._create(
            keys=[
                self.keys.api_batch(batch_id),
                self.keys.api_batches(),
                self.keys.api_batches_active(),
            ],
            args=[batch_id, repr(time.time()), FILE_TTL_S, *flat],
        )
        return bool(created)

    async def batch(self, batch_id: str) -> dict[str, str] | None:
        raw = await self.redis.hgetall(self.keys.api_batch(batch_id))
        return raw if raw.get("status") else None

    async def transition(self, batch_id: str, allowed: tuple[str, ...], **fields: Any) -> bool:
        """Set `fields` if the batch's status is one of `allowed` (one atomic step)."""
        flat = [str(item) for pair in fields.items() for item in pair]
        done = await self._transition(
            keys=[self.keys.api_batch(batch_id)], args=[",".join(allowed)] + flat
        )
        return bool(done)

    async def counts(self, batch_id: str, raw: dict[str, str]) -> dict[str, int]:
        """request_counts: stored once final, else the sizes of the outcome hashes."""
        total = int(raw.get("total") or 0)
        if raw.get("status") in FINAL_STATUSES or raw.get("status") == "validating":
            return {
                "total": total,
                "completed": int(raw.get("completed") or 0),
                "failed": int(raw.get("failed") or 0),
            }
        pipe = self.redis.pipeline(transaction=False)
        pipe.hlen(self.keys.api_batch_output(batch_id))
        pipe.hlen(self.keys.api_batch_errors(batch_id))
        completed, failed = await pipe.execute()
        return {"total": total, "completed": int(completed), "failed": int(failed)}

    async def look_later(self, batch_id: str, delay_s: float) -> None:
        await self.redis.zadd(
            self.keys.api_batches_active(), {batch_id: time.time() + delay_s}, xx=True
        )

    async def due(self, limit: int) -> list[str]:
        """Active batches due a look now (every process sweeps these)."""
        active = self.keys.api_batches_active()
        return list(await self.redis.zrangebyscore(active, "-inf", time.time(), 0, limit))

    # Leases

    async def lease(self, batch_id: str, role: str, ttl_s: float) -> Lease | None:
        """This process's lease on `role` for the batch (renewed while held), or None
        while another process holds it."""
        token = uuid.uuid4().hex
        key = self.keys.api_batch_lock(batch_id, role)
        if not await self.redis.set(key, token, nx=True, px=int(ttl_s * 1000)):
            return None
        return Lease(self, key, token, ttl_s)


class Lease:
    """A lease a process holds: its expiry is pushed on every `ttl_s / 3` until it is
    released; `held` turns False if it was lost (a stall past `ttl_s`)."""

    def __init__(self, store: BatchStore, key: str, token: str, ttl_s: float) -> None:
        self.store = store
        self.key = key
        self.token = token
        self.ttl_s = ttl_s
        self.held = True
        self._keeper = asyncio.get_running_loop().create_task(self._keep())

    async def _keep(self) -> None:
        while self.held:
            await asyncio.sleep(self.ttl_s / 3)
            with contextlib.suppress(Exception):  # Redis away: the next beat tries again
                self.held = await self._set_expiry(self.ttl_s)

    async def _set_expiry(self, seconds: float) -> bool:
        args = [self.token, int(seconds * 1000)]
        return bool(await self.store.set_lock_expiry(keys=[self.key], args=args))

    async def release(self, linger_s: float = 0) -> None:
        """Give it back; with `linger_s` it stays taken that long (a throttle)."""
        self._keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._keeper
        if self.held:
            await asyncio.shield(self._set_expiry(linger_s))
            self.held = False


def line_keys(keys: KeySpace, batch_id: str) -> list[str]:
    """The keys (in `keys`) of a batch's lines and outcomes (gone once its files are
    written)."""
    return [
        keys.api_batch_lines(batch_id),
        keys.api_batch_pending(batch_id),
        keys.api_batch_output(batch_id),
        keys.api_batch_errors(batch_id),
    ]


def batch_view(raw: dict[str, str], counts: dict[str, int]) -> dict[str, Any]:
    """OpenAI's batch object from its hash and its request counts."""
    view: dict[str, Any] = {
        "id": raw["id"],
        "object": "batch",
        "endpoint": raw.get("endpoint", ""),
        "input_file_id": raw.get("input_file_id", ""),
        "completion_window": raw.get("completion_window", "24h"),
        "status": raw["status"],
        "output_file_id": raw.get("output_file_id") or None,
        "error_file_id": raw.get("error_file_id") or None,
        "errors": json.loads(raw["errors"]) if raw.get("errors") else None,
        "request_counts": counts,
        "metadata": json.loads(raw["metadata"]) if raw.get("metadata") else None,
    }
    for name in INT_FIELDS:
        view[name] = int(raw[name]) if raw.get(name) else None
    return view
