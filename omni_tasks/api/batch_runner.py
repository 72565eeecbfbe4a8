"""Running batches, by whichever API process is alive.

- **Launch** (`batch_launch`): check the input, store the lines, submit the requests.
- **Follow**: the lines still pending whose requests all ended get their output or
  error line (`batch_outcomes.outcome`); when none is pending the batch is finalized:
  its output and error files are written, with its final status, in one step.
- **Cancel / expire**: the pending requests are withdrawn; the lines that never ran
  end as `batch_cancelled` / `batch_expired`, the running ones get `CANCEL_GRACE_S` to
  finish.

Each step runs under a lease (`BatchStore.lease`) and every write is idempotent, so
a process that dies mid-way leaves the batch to the next one: each process sweeps the
active batches every `SWEEP_S`, and a `GET` follows the batch it reads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import Any

from omni_tasks.api.batch_launch import CHUNK, BatchLauncher
from omni_tasks.api.batch_outcomes import outcome
from omni_tasks.api.batch_state import FILE_TTL_S, FINAL_STATUSES, BatchStore, line_keys
from omni_tasks.api.files import output_root
from omni_tasks.api.hub import ResultHub, TaskSet, sweep_forever
from omni_tasks.api.submission import LiveWorkers
from omni_tasks.requests import RequestType
from omni_tasks.tasks.producer import cancel

log = logging.getLogger(__name__)

REFRESH_LEASE_S = 60.0
#: A batch is followed at most this often, however many clients poll it.
REFRESH_SPACING_S = 0.5
FINALIZE_LEASE_S = 120.0
SWEEP_S = 2.0
#: How long a cancelled or expired batch waits for the requests already running.
CANCEL_GRACE_S = 60.0
#: How many pending lines one read of the result backend covers.
FOLLOW_CHUNK = 1000


def output_file_id(batch_id: str, kind: str) -> str:
    """The fixed id of a batch's output or error file (written again, the same file)."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


class BatchRunner:
    """This process's part in running batches: launches, follows, its sweep."""

    def __init__(self, hub: ResultHub, workers: LiveWorkers) -> None:
        self.hub = hub
        self.keys = hub.keys
        self.root = output_root(workers.config)  # where the lines' images are
        self.store = BatchStore(hub.redis, hub.keys)
        self.launcher = BatchLauncher(hub, self.store, workers)
        self._tasks = TaskSet()

    async def start(self) -> None:
        self._tasks.spawn(sweep_forever(self.sweep, SWEEP_S, "batch", log))

    async def stop(self) -> None:
        await self._tasks.cancel_all()

    def launch_soon(self, batch_id: str) -> None:
        """Launch the batch in the background (nothing if another process does)."""
        self._tasks.spawn(self.launcher.launch(batch_id))

    async def refresh(self, batch_id: str) -> None:
        """Record the outcomes of the lines that ended; finalize once none is pending.
        At most one process at a time, at most every `REFRESH_SPACING_S`."""
        lease = await self.store.lease(batch_id, "refresh", REFRESH_LEASE_S)
        if lease is None:
            return
        try:
            raw = await self.store.batch(batch_id)
            if raw is None or raw["status"] in FINAL_STATUSES:
                await self.hub.redis.zrem(self.keys.api_batches_active(), batch_id)
                return
            if raw["status"] == "validating":
                return
            if raw["status"] == "in_progress" and not raw.get("ending"):
                if time.time() > float(raw.get("expires_at") or "inf"):
                    await self.stop_batch(batch_id, "expired")
                    raw = await self.store.batch(batch_id) or raw
            await self._follow(batch_id, raw)
            await self.finalize(batch_id)
        finally:
            await lease.release(REFRESH_SPACING_S)

    async def _follow(self, batch_id: str, raw: dict[str, str]) -> None:
        redis = self.hub.redis
        ending = raw.get("ending") or None
        waited_out = bool(ending) and time.time() > float(raw["ending_at"]) + CANCEL_GRACE_S
        pending = sorted(
            int(i) for i in await redis.smembers(self.keys.api_batch_pending(batch_id))
        )
        base_url = raw.get("base_url", "")
        for start in range(0, len(pending), FOLLOW_CHUNK):
            part = [str(i) for i in pending[start : start + FOLLOW_CHUNK]]
            found = await redis.hmget(self.keys.api_batch_lines(batch_id), part)
            records = {i: json.loads(r) for i, r in zip(part, found, strict=True) if r}
            ids = [rid for r in records.values() for rid in r["ids"]]
            metas = dict(zip(ids, await self.hub.metas(ids), strict=True)) if ids else {}
            pipe = redis.pipeline(transaction=True)
            for index, record in records.items():
                line_metas = [metas[rid] for rid in record["ids"]]
                ended = await outcome(
                    batch_id,
                    int(index),
                    record,
                    line_metas,
                    ending,
                    waited_out,
                    base_url,
                    self.root,
                )
                if ended is not None:
                    kind, text = ended
                    target = (
                        self.keys.api_batch_output
                        if kind == "output"
                        else self.keys.api_batch_errors
                    )
                    pipe.hset(target(batch_id), index, text)
                    pipe.srem(self.keys.api_batch_pending(batch_id), index)
            await pipe.execute()

    async def finalize(self, batch_id: str) -> None:
        """Write the output and error files and the final status, in one step, once no
        line is pending and no launch is under way."""
        redis = self.hub.redis
        if await redis.scard(self.keys.api_batch_pending(batch_id)):
            return
        if await redis.exists(self.keys.api_batch_lock(batch_id, "launch")):
            return
        lease = await self.store.lease(batch_id, "finalize", FINALIZE_LEASE_S)
        if lease is None:
            return
        try:
            now = int(time.time())
            running = ("in_progress", "cancelling", "finalizing")
            if not await self.store.transition(
                batch_id, running, status="finalizing", finalizing_at=now
            ):
                return
            raw = await self.store.batch(batch_id)
            assert raw is not None
            await self._write_final(batch_id, raw, now)
        finally:
            await lease.release()

    async def _write_final(self, batch_id: str, raw: dict[str, str], now: int) -> None:
        redis = self.hub.redis
        output = await redis.hgetall(self.keys.api_batch_output(batch_id))
        errors = await redis.hgetall(self.keys.api_batch_errors(batch_id))
        status = raw.get("ending") or "completed"
        ttl = int(raw.get("output_ttl") or FILE_TTL_S)
        fields: dict[str, Any] = {"status": status, f"{status}_at": now}
        fields.update(completed=len(output), failed=len(errors))
        pipe = redis.pipeline(transaction=True)
        for kind, lines in (("output", output), ("error", errors)):
            if not lines:
                continue
            file_id = output_file_id(batch_id, kind)
            content = "".join(lines[i] + "\n" for i in sorted(lines, key=int))
            meta = {"id": file_id, "bytes": str(len(content.encode())), "created_at": str(now)}
            meta.update(filename=f"{batch_id}_{kind}.jsonl", purpose="batch_output")
            meta["expires_at"] = str(now + ttl)
            self.store.add_file(pipe, meta, content, ttl)
            fields[f"{kind}_file_id"] = file_id
        pipe.hset(self.keys.api_batch(batch_id), mapping=fields)
        pipe.delete(*line_keys(self.keys, batch_id))
        pipe.zrem(self.keys.api_batches_active(), batch_id)
        await pipe.execute()

    async def stop_batch(self, batch_id: str, ending: str) -> bool:
        """Cancel (`ending` "cancelled") or expire a running batch: withdraw its pending
        requests. False when it is past stopping (or stopping already)."""
        now = int(time.time())
        fields: dict[str, Any] = {"ending": ending, "ending_at": now}
        if ending == "cancelled":
            fields.update(status="cancelling", cancelling_at=now)
        raw = await self.store.batch(batch_id)
        if raw is None or raw.get("ending"):
            return False
        if not await self.store.transition(batch_id, ("validating", "in_progress"), **fields):
            return False
        self._tasks.spawn(self._withdraw_pending(batch_id))  # one revoke per request: can be long
        return True

    async def _withdraw_pending(self, batch_id: str) -> None:
        """Cancel the requests of the lines still pending that were sent (the launch
        sends no more); their lines end once they are final, or at once if they never
        started."""
        redis = self.hub.redis
        try:
            cursor = await redis.hget(self.keys.api_batch(batch_id), "submitted")
            sent = int(cursor or 0) + CHUNK  # and the chunk that may be on its way
            pending = [
                i
                for i in await redis.smembers(self.keys.api_batch_pending(batch_id))
                if int(i) < sent
            ]
            for start in range(0, len(pending), FOLLOW_CHUNK):
                part = pending[start : start + FOLLOW_CHUNK]
                found = await redis.hmget(self.keys.api_batch_lines(batch_id), part)
                records = [json.loads(r) for r in found if r]
                await asyncio.to_thread(_cancel_all, records)
        except Exception:  # what still runs ends on its own; its line waits for it
            log.warning("batch %s: withdrawing its requests failed", batch_id, exc_info=True)

    async def sweep(self) -> None:
        """Move on the active batches due a look: launch what is not launched, follow
        the rest."""
        for batch_id in await self.store.due(50):
            await self.store.look_later(batch_id, SWEEP_S)
            raw = await self.store.batch(batch_id)
            if raw is None:
                await self.hub.redis.zrem(self.keys.api_batches_active(), batch_id)
                continue
            unsent = int(raw.get("submitted") or 0) < int(raw.get("total") or 0)
            if raw["status"] == "validating" or (
                raw["status"] == "in_progress" and unsent and not raw.get("ending")
            ):
                self.launch_soon(batch_id)
            if raw["status"] != "validating":
                await self.refresh(batch_id)


def _cancel_all(records: list[dict[str, Any]]) -> None:
    for record in records:
        kind = RequestType(record["type"]) if record.get("type") else None
        for request_id in record["ids"]:
            cancel(request_id, kind)
