"""Launching a batch: read its input file, check it (`batch_lines.parse`: a bad file
fails the batch), store each line's record, then submit the requests in chunks of
`CHUNK`, one admission round trip each, keeping a cursor in the batch's hash.

Batches fill at most `BATCH_SHARE` of a pool's `scheduler.max_queue_size`, so
interactive calls still find room (and, at the low class, pass the batch in the
queue); the launch waits for room meanwhile. No live worker is needed: the requests
wait in their queues. One process launches a batch at a time (under a lease it keeps
renewed); another takes over from the cursor if it dies, and the stable request ids
make a chunk sent twice run once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from omni_tasks.api.batch_lines import Built, Line, build, parse
from omni_tasks.api.batch_outcomes import refused_line
from omni_tasks.api.batch_state import FILE_TTL_S, BatchStore, Lease, line_keys
from omni_tasks.api.errors import from_core_error
from omni_tasks.api.hub import ResultHub
from omni_tasks.api.submission import LiveWorkers
from omni_tasks.config import CoreModuleConfig
from omni_tasks.errors import BrokerUnavailableError, CoreModuleError, QueueFullError
from omni_tasks.requests import OmniRequest, stages_of
from omni_tasks.tasks.batch_submit import submit_many

log = logging.getLogger(__name__)

CHUNK = 256
#: The part of a pool's `scheduler.max_queue_size` that batch requests may fill.
BATCH_SHARE = 0.5
LAUNCH_LEASE_S = 20.0
#: How long the launch waits for room in a pool (or for Redis) before trying again.
FULL_WAIT_S = 1.0
#: How many lines one Redis round trip stores.
STORE_CHUNK = 1000


class BatchLauncher:
    """Validates and submits batches (`launch`), for this process."""

    def __init__(self, hub: ResultHub, store: BatchStore, workers: LiveWorkers) -> None:
        self.hub = hub
        self.keys = hub.keys
        self.store = store
        self.workers = workers

    async def launch(self, batch_id: str) -> None:
        """Validate the batch's input (if not done yet) and submit what is left of it."""
        lease = await self.store.lease(batch_id, "launch", LAUNCH_LEASE_S)
        if lease is None:
            return
        try:
            raw = await self.store.batch(batch_id)
            if raw is None or raw["status"] not in ("validating", "in_progress"):
                return
            built = await self._lines(batch_id, raw)
            raw = await self.store.batch(batch_id)
            if built is not None and raw is not None and raw["status"] == "in_progress":
                await self._submit(batch_id, built, lease)
        except Exception:
            log.warning("batch %s: launch failed; the sweep resumes it", batch_id, exc_info=True)
        finally:
            await lease.release()

    async def _lines(self, batch_id: str, raw: dict[str, str]) -> list[Built] | None:
        """The lines of the batch, built; stored first when the batch is validating."""
        content = await self.store.content(raw["input_file_id"])
        if content is None:
            error = {"code": "file_not_found", "line": None, "param": "input_file_id"}
            error["message"] = f"the input file {raw['input_file_id']} no longer exists"
            await self._fail(batch_id, [error])
            return None
        parsed = await asyncio.to_thread(parse, content)
        if parsed.errors:
            await self._fail(batch_id, parsed.errors)
            return None
        models = await self._text_models() if raw["status"] == "validating" else None
        config = self.workers.config
        built = await asyncio.to_thread(_build_all, parsed.lines, batch_id, models, config)
        if raw["status"] == "validating":
            await self._store_lines(batch_id, built)
            now = int(time.time())
            await self.store.transition(
                batch_id, ("validating",), status="in_progress", in_progress_at=now
            )
        pending = await self.hub.redis.smembers(self.keys.api_batch_pending(batch_id))
        return [b if str(i) in pending else Built(b.record, []) for i, b in enumerate(built)]

    async def _fail(self, batch_id: str, errors: list[dict[str, Any]]) -> None:
        body = json.dumps({"object": "list", "data": errors})
        now = int(time.time())
        await self.store.transition(
            batch_id, ("validating",), status="failed", failed_at=now, errors=body
        )
        await self.hub.redis.zrem(self.keys.api_batches_active(), batch_id)

    async def _text_models(self) -> set[str] | None:
        """The text models live AR workers serve; None when no AR worker is live (or
        none says), so a batch's text requests wait for one."""
        serving = await self.workers.serving("ar")
        served = {w["models"]["ar"] for w in serving if "ar" in w["models"]}
        return served or None

    async def _store_lines(self, batch_id: str, built: list[Built]) -> None:
        ttl = FILE_TTL_S
        for start in range(0, len(built), STORE_CHUNK):
            pipe = self.hub.redis.pipeline(transaction=False)
            part = built[start : start + STORE_CHUNK]
            records = {str(start + i): json.dumps(b.record) for i, b in enumerate(part)}
            pipe.hset(self.keys.api_batch_lines(batch_id), mapping=records)
            valid = [str(start + i) for i, b in enumerate(part) if b.error is None]
            if valid:
                pipe.sadd(self.keys.api_batch_pending(batch_id), *valid)
            refused = {
                str(start + i): refused_line(batch_id, start + i, b.record, b.error)
                for i, b in enumerate(part)
                if b.error is not None
            }
            if refused:
                pipe.hset(self.keys.api_batch_errors(batch_id), mapping=refused)
            for key in line_keys(self.keys, batch_id):
                pipe.expire(key, ttl)
            await pipe.execute()
        await self.hub.redis.hset(self.keys.api_batch(batch_id), "total", len(built))

    async def _submit(self, batch_id: str, built: list[Built], lease: Lease) -> None:
        """Submit the lines from the batch's cursor on, a chunk at a time, while the
        batch runs on and this process holds the launch lease."""
        index = int((await self.hub.redis.hget(self.keys.api_batch(batch_id), "submitted")) or 0)
        while index < len(built):
            if not lease.held:
                return
            raw = await self.store.batch(batch_id)
            if raw is None or raw["status"] != "in_progress" or raw.get("ending"):
                return
            end, requests = await self._take(built, index)
            if end == index:
                await asyncio.sleep(FULL_WAIT_S)
                continue
            try:
                await self._send(batch_id, built, index, end, requests)
            except (QueueFullError, BrokerUnavailableError) as exc:
                log.info("batch %s: submission waits: %s", batch_id, exc)
                await asyncio.sleep(FULL_WAIT_S)
                continue
            index = end
            await self.hub.redis.hset(self.keys.api_batch(batch_id), "submitted", index)

    async def _take(self, built: list[Built], index: int) -> tuple[int, list[OmniRequest]]:
        """(the end of the next chunk, its requests): lines in order, while the pools
        have room for batch requests; a pool with nothing admitted takes one line."""
        config = self.workers.config
        limit = config.scheduler.max_queue_size
        room: dict[str, int] = {}
        taken: list[OmniRequest] = []
        end = index
        while end < len(built) and len(taken) < CHUNK:
            requests = built[end].requests
            if requests:
                pool = config.pool_for(stages_of(requests[0].request_type)[0]).queue
                if pool not in room:
                    held = int(await self.hub.redis.zcard(self.keys.admitted(pool)))
                    room[pool] = int(limit * BATCH_SHARE) - held
                    if not held:
                        room[pool] = max(room[pool], len(requests))
                if room[pool] < len(requests):
                    break
                room[pool] -= len(requests)
                taken += requests
            end += 1
        return end, taken

    async def _send(
        self, batch_id: str, built: list[Built], start: int, end: int, requests: list[OmniRequest]
    ) -> None:
        """One admission round trip for the chunk; a request the producer refuses for
        good (a conflicting id) makes its line an error line, the others go on."""
        if not requests:
            return
        try:
            await asyncio.to_thread(submit_many, requests)
            return
        except (QueueFullError, BrokerUnavailableError):
            raise
        except CoreModuleError:
            pass
        for index in range(start, end):
            line = built[index]
            if not line.requests:
                continue
            try:
                await asyncio.to_thread(submit_many, line.requests)
            except (QueueFullError, BrokerUnavailableError):
                raise
            except CoreModuleError as exc:
                error = refused_line(
                    batch_id,
                    index,
                    line.record,
                    from_core_error(exc, self.workers.config.api.retry_after_s),
                )
                pipe = self.hub.redis.pipeline(transaction=True)
                pipe.hset(self.keys.api_batch_errors(batch_id), str(index), error)
                pipe.srem(self.keys.api_batch_pending(batch_id), str(index))
                await pipe.execute()


def _build_all(
    lines: list[Line], batch_id: str, models: set[str] | None, config: CoreModuleConfig
) -> list[Built]:
    return [build(line, batch_id, models, config) for line in lines]
