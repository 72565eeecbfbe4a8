"""The reaper: gives back what a dead worker held, and publishes again what was lost.

Every live worker runs a `Reaper` thread; a Redis lock lets one of them do each pass.
A pass, every `reaper_interval_s`:

With a Redis broker only (RabbitMQ requeues a lost connection's messages itself):

1. **Dead workers' messages**: kombu keeps every delivered, unacked
   message in its `unacked` hash until the visibility timeout (hours, for long jobs).
   Each worker's heartbeat lists the task ids it holds (`KeySpace.held`). A message unacked
   for longer than two beats that no live worker holds belongs to a dead worker: it is
   restored to the front of its queue at once, with kombu's own atomic restore (marked
   redelivered, so the redelivery cap applies).
2. **Lost requests**: an open ledger entry older than `ledger_grace_s`
   whose result is not final, and that is neither queued, unacked, nor held by a live
   worker, is published again (`omni_tasks.coordination.ledger`). Final ones are closed.

With any broker:

3. **Admissions nothing will release** (`omni_tasks.coordination.admission`): an id
   admitted longer than `ledger_grace_s` ago whose result is final leaves its pool's
   count (its release was lost with its worker). With a Redis broker, so does one that
   is neither open in the ledger (itself or its chain's first stage) nor queued,
   unacked or held: no message of it is left to end it.

No pass runs while Redis has been up for less than `UNACKED_MIN_AGE_S` (just started
again): a held set lost with a restart would make a live worker's messages look
orphaned before it beats again.

1 and 2 are counted per pool (`restored`, `recovered`); a pass returns all three. A
message restored or published twice runs once: workers skip a message whose result is
already final.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

import redis
from celery import Celery, states

from omni_tasks.coordination import admission, ledger, worker_index
from omni_tasks.coordination.client import OmniRedis
from omni_tasks.coordination.counters import count_outcome
from omni_tasks.coordination.outage import Outage
from omni_tasks.coordination.queue_walk import queued_among
from omni_tasks.errors import RequestValidationError
from omni_tasks.tasks.definitions import PROMPT_STAGE_SUFFIX
from workers.lifecycle.heartbeat import HEARTBEAT_INTERVAL_S
from workers.runtime import WorkerRuntime
from workers.runtime import runtime as process_runtime

log = logging.getLogger(__name__)
#: A message unacked for less than this may not be in its worker's held set yet; a
#: Redis up for less than this may not have heard every live worker's beat yet.
UNACKED_MIN_AGE_S = 2 * HEARTBEAT_INTERVAL_S + 1
#: The worker index drops long-dead entries once in this many of a reaper's passes.
PRUNE_EVERY = 30


class Reaper:
    """One worker's reaper thread (see the module docstring)."""

    def __init__(self, app: Celery, runtime: WorkerRuntime | None = None) -> None:
        """`runtime`: whose config and Redis client the passes use (default: this
        process's)."""
        self.app = app
        self.runtime = runtime or process_runtime
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connection: Any = None
        self._passes = 0

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="omni-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        interval = self.runtime.config.reaper_interval_s
        outage = Outage("reaper", log)  # one line per backoff step while Redis is away
        while not self._stop.wait(outage.pause(interval)):
            if not outage.run(self.run_once):
                self._close()

    def run_once(self) -> dict[str, int]:
        """One pass, if no other worker holds the lock; returns what it did. A pass with
        nothing due costs the lock and four range reads; what it reads besides is
        O(unacked + entries due), never O(queued) (`_Whereabouts`)."""
        token = uuid.uuid4().hex
        lock_ms = int(self.runtime.config.reaper_interval_s * 1000)
        client = self.runtime.redis
        if not client.set(self.runtime.keys.reaper_lock(), token, nx=True, px=lock_ms):
            return {}
        self._passes += 1
        if self._passes % PRUNE_EVERY == 0:
            worker_index.prune(client)
        redis_broker = self._redis_broker()
        before = time.time() - self.runtime.config.ledger_grace_s
        tags = self._orphan_candidates() if redis_broker else []
        due = ledger.open_since(client, before) if redis_broker else []
        queues = self.runtime.config.pool_queues()
        admitted = [i for q in queues for i in admission.admitted_before(client, q, before)]
        if not (tags or due or admitted):
            return {}
        if int(client.info("server")["uptime_in_seconds"]) < UNACKED_MIN_AGE_S:
            # Redis started again moments ago: live workers have not all beaten since,
            # and a held set lost with the restart would read as a dead worker's.
            return {}
        where = _Whereabouts(self)
        if not redis_broker:
            # RabbitMQ requeues a lost connection's messages itself, and a publish is
            # confirmed: neither loss 1 or 2 covers happens there.
            return {"released": self._reconcile_admissions(admitted, where)}
        done = {
            "restored": self._restore_orphans(tags, where.held()),
            "recovered": self._recover_lost(due, where),
        }
        return {**done, "released": self._reconcile_admissions(admitted, where)}

    # -- 1. dead workers' unacked messages ------------------------------------------
    def _orphan_candidates(self) -> list[str]:
        """Delivery tags unacked for longer than two beats (their worker may be gone)."""
        channel = self._channel()
        cutoff = time.time() - UNACKED_MIN_AGE_S
        return list(self.runtime.redis.zrangebyscore(channel.unacked_index_key, "-inf", cutoff))

    def _restore_orphans(self, tags: list[str], held: set[str]) -> int:
        if not tags:
            return 0
        channel = self._channel()
        client = self.runtime.redis
        pipe = client.pipeline(transaction=False)
        for tag in tags:
            pipe.hget(channel.unacked_key, tag)
        restored = 0
        for tag, raw in zip(tags, pipe.execute(), strict=True):
            if raw is None:
                continue
            task_id, queue = _id_and_queue(raw)
            if task_id in held:
                continue
            channel.qos.restore_by_tag(tag)
            restored += 1
            log.warning("restored %s (task %s): its worker is gone", tag, task_id)
            _note_own_queue(client, queue)
            _count(self.runtime.redis, queue, "restored")
        return restored

    # -- 2. lost requests -------------------------------------------------------------
    def _recover_lost(self, ids: list[str], where: _Whereabouts) -> int:
        if not ids:
            return 0
        pending = self._not_final(ids)
        if not pending:
            return 0
        recovered = 0
        before = time.time() - self.runtime.config.ledger_grace_s
        for task_id in pending - where.present(pending, before):
            entry = ledger.entry(self.runtime.redis, task_id)
            if entry is None:
                ledger.forget(self.runtime.redis, [task_id])
                continue
            task = self.app.tasks[entry["task"]]
            try:
                with admission.unlimited():  # admitted when first accepted: never refused
                    task.apply_async(
                        entry["args"],
                        entry["kwargs"],
                        task_id=task_id,
                        headers={ledger.REPUBLISHED_HEADER: True},  # not a repeat
                        **entry["options"],
                    )
            except RequestValidationError as exc:  # sent by name and never valid:
                self.app.backend.mark_as_failure(task_id, exc)  # it fails, as on a worker
                ledger.forget(self.runtime.redis, [task_id])
                log.warning("lost request %s is invalid: %s", task_id, exc)
                continue
            ledger.touch(self.runtime.redis, task_id)
            recovered += 1
            log.warning("published lost request %s again", task_id)
            _count(self.runtime.redis, task.stage_queue, "recovered")
        return recovered

    # -- 3. admissions nothing will release -------------------------------------------
    def _reconcile_admissions(self, ids: list[str], where: _Whereabouts) -> int:
        before = time.time() - self.runtime.config.ledger_grace_s
        if not ids:
            return 0
        pending = self._not_final(ids)
        ended = set(ids) - pending
        if pending and self._redis_broker():
            live = _with_first_stages(pending)
            accounted = self._open_in_ledger(live)
            if not live <= accounted:
                accounted |= where.present(live - accounted, before)
            ended |= {i for i in pending if not _with_first_stages({i}) & accounted}
        admission.release(self.runtime.redis, self.runtime.config.pool_queues(), ended)
        for task_id in ended:
            log.warning("released the admission of %s: its request has ended", task_id)
        return len(ended)

    def _open_in_ledger(self, ids: set[str]) -> set[str]:
        ordered = sorted(ids)
        pipe = self.runtime.redis.pipeline(transaction=False)
        open_key = self.runtime.keys.ledger_open()
        for task_id in ordered:
            pipe.zscore(open_key, task_id)
        return {i for i, score in zip(ordered, pipe.execute(), strict=True) if score is not None}

    def _not_final(self, ids: list[str]) -> set[str]:
        """Of `ids`, those without a final result; the final ones leave the ledger."""
        backend = self.app.backend
        pipe = self.runtime.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.get(backend.get_key_for_task(task_id).decode())
        final: list[str] = []
        pending: set[str] = set()
        for task_id, raw in zip(ids, pipe.execute(), strict=True):
            status = json.loads(raw).get("status") if raw else states.PENDING
            if status in states.READY_STATES:
                final.append(task_id)
            else:
                pending.add(task_id)
        ledger.forget(self.runtime.redis, final)
        return pending

    # -- what is where ----------------------------------------------------------------
    def unacked_ids(self) -> set[str]:
        if not self._redis_broker():
            return set()
        raw = self.runtime.redis.hvals(self._channel().unacked_key)
        return {_id_and_queue(r)[0] for r in raw}

    # -- the broker connection ---------------------------------------------------------
    def _redis_broker(self) -> bool:
        return self.runtime.config.broker_is_redis

    def _channel(self) -> Any:
        if self._connection is None:
            self._connection = self.app.connection_for_write()
        return self._connection.default_channel

    def _close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.release()
            finally:
                self._connection = None


class _Whereabouts:
    """Where the requests a pass asks about are, each source read once a pass and only
    if asked: held by a live worker (the worker index's held sets), unacked (kombu's
    hash), or queued (`queued_among`: a walk from the old end of each list, not the
    whole queue)."""

    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper
        self._held: set[str] | None = None
        self._unacked: set[str] | None = None

    def held(self) -> set[str]:
        if self._held is None:
            client, keys = self._reaper.runtime.redis, self._reaper.runtime.keys
            hosts = worker_index.live(client)
            pipe = client.pipeline(transaction=False)
            for host in hosts:
                pipe.smembers(keys.held(host))
            self._held = set().union(*pipe.execute()) if hosts else set()
        return self._held

    def present(self, ids: set[str], published_before: float) -> set[str]:
        """Of `ids` (all published before `published_before`), those held, unacked or
        queued."""
        if self._unacked is None:
            self._unacked = self._reaper.unacked_ids()
        found = ids & (self.held() | self._unacked)
        runtime = self._reaper.runtime
        queued = queued_among(runtime.redis, runtime.config, ids - found, published_before)
        return found | queued


def _id_and_queue(raw: str | bytes, payload_only: bool = False) -> tuple[str, str]:
    """(task id, routing key) of a kombu Redis entry: an unacked `[payload, exchange,
    routing_key]` triple or, with `payload_only`, a queued payload. Unreadable -> ''."""
    try:
        value = json.loads(raw)
        payload = value if payload_only else value[0]
        headers = payload.get("headers") or {}
        routing_key = payload["properties"]["delivery_info"].get("routing_key") or ""
        return str(headers.get("id") or ""), str(routing_key)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "", ""


def _with_first_stages(ids: set[str]) -> set[str]:
    """`ids` and the first-stage task ids of the MULTIMODAL chains they may end."""
    return ids | {i + PROMPT_STAGE_SUFFIX for i in ids}


def _note_own_queue(client: OmniRedis, queue: str) -> None:
    """A message restored into a dead worker's own queue: list that worker in the index
    (as dead, unless it is there) so that a live worker's sweep moves the message back
    to the pool."""
    keys = client.keyspace
    prefix = keys.worker_queue("")
    if queue.startswith(prefix):
        client.zadd(keys.worker_beats(worker_index.DIT), {queue[len(prefix) :]: 0}, nx=True)


def _count(client: redis.Redis, queue: str, outcome: str) -> None:
    try:
        count_outcome(client, queue or "unknown", outcome)
    except Exception:
        log.warning("could not count %s", outcome, exc_info=True)
