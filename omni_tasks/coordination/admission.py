"""Admission: `scheduler.max_queue_size` per pool, held on every enqueue path and across
any number of producer processes.

Each pool keeps a sorted set of the requests it admitted and that are not final yet
(`KeySpace.admitted`: id -> when admitted); its size is the pool's count. One Lua script
(`scripts/admit.lua`) checks the size and adds the id in one step, so concurrent
producers never overshoot. The id is the request's final task id (a MULTIMODAL chain's
last stage): a chain is counted once, in the pool of its first stage, and a message
published again under the same id is not counted twice.

The same step checks the request id against the request accepted under it before
(`idempotency`): a repeat is not admitted again, a conflict is refused.

Workers release an id when its request ends (completed, failed, cancelled, expired,
refused); releasing is a ZREM, so doing it twice is harmless. The worker-side reaper
reconciles what a lost worker or a lost release leaves behind (`workers.lifecycle.reaper`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination import idempotency, ledger
from omni_tasks.coordination.client import OmniRedis
from omni_tasks.coordination.keyspace import KeySpace, keyspace
from omni_tasks.coordination.outage import Outage
from omni_tasks.errors import QueueFullError, RequestConflictError

log = logging.getLogger(__name__)

#: `scripts/admit.lua` statuses besides admitted (1) and not admitted again (0).
FULL, REPEAT, CONFLICT = -1, 2, -2

#: A limit other than the config's for this context (an `OmniScheduler`'s own config).
_limit: ContextVar[int | None] = ContextVar("omni_admission_limit", default=None)


@dataclass(frozen=True)
class Admission:
    """One accepted request: `added` is False when it was admitted before (a republish)
    or not counted here (a chain's later stage); `recorded` is its ledger entry's id;
    `repeat` is True when the same request was accepted under its id before (nothing
    was admitted or recorded: it must not be published again); `fingerprinted` when
    its fingerprint was recorded here."""

    queue: str
    admission_id: str
    added: bool
    recorded: str | None = None
    repeat: bool = False
    fingerprinted: bool = False

    def undo(self, client: OmniRedis, queues: Iterable[str]) -> None:
        """Its publish failed: give the place back (in the pools of `queues`), unless an
        earlier publish holds it, close its ledger entry, so that nothing runs it later,
        and free its id."""
        if self.added:
            release(client, queues, [self.admission_id])
        if self.recorded:
            ledger.forget(client, [self.recorded])
        if self.fingerprinted:
            idempotency.forget(client, self.admission_id)


def admit(
    client: OmniRedis,
    config: CoreModuleConfig,
    queue: str,
    admission_id: str,
    *,
    enforce: bool = True,
    counted: bool = True,
    entry: ledger.Entry | None = None,
    fingerprint: str | None = None,
    message: tuple[str, str] | None = None,
    events: list[tuple[str, str]] | None = None,
) -> Admission:
    """Count `admission_id` in the pool of `queue` (`config`'s limit, `current_limit`),
    or raise `QueueFullError`; with
    `entry`, record the request in the ledger in the same step (`scripts/admit.lua`),
    and with `message` (a queue's list and kombu's JSON envelope, beside `entry`)
    publish it there too, and its `events` ((channel, payload): the task-sent event).

    `enforce=False` counts it without the limit: a stage published by a worker for a
    request already admitted, or a lost request published again. `counted=False`
    does not count it at all (a chain's later stage, counted with its first).
    With `fingerprint`, the id is checked first (`idempotency`): the same fingerprint
    under it is a repeat (`Admission.repeat`, nothing admitted or recorded), another one
    raises `RequestConflictError`.
    """
    if not admission_id:
        raise ValueError("admission_id must not be empty")
    limit = (current_limit(config) if enforce else 0) if counted else -1
    ttl_s = int(config.result_expires)
    space = keyspace(config.key_prefix)
    script_keys = [space.admitted(queue), space.request_fingerprint(admission_id)]
    script_args: list[Any] = [admission_id, limit, time.time(), fingerprint or "", ttl_s]
    if entry is not None:
        script_keys += entry.keys_in(space)
        script_args += entry.script_args(ttl_s)
        if message is not None:
            script_keys.append(message[0])
            script_args.append(message[1])
            for topic, payload in events or ():
                script_args += [topic, payload]
    elif message is not None:
        raise ValueError("a message is published with its ledger entry")
    reply = client.scripts.admit(keys=script_keys, args=script_args)
    status, count = (int(v) for v in reply)
    if status == CONFLICT:
        raise RequestConflictError(admission_id)
    if status == FULL:
        raise QueueFullError(
            f"pool {pool_name(queue, config)!r} (queue {queue!r}) is full: {count} requests "
            f"admitted, max_queue_size={limit}; request {admission_id} not enqueued"
        )
    if status == REPEAT:
        return Admission(queue, admission_id, added=False, repeat=True)
    recorded = entry.task_id if entry else None
    return Admission(queue, admission_id, status == 1, recorded, fingerprinted=bool(fingerprint))


@dataclass(frozen=True)
class Asked:
    """One request of a batch to accept (`admit_many`): what `admit` takes for it."""

    queue: str
    admission_id: str
    enforce: bool = True
    counted: bool = True
    entry: ledger.Entry | None = None
    fingerprint: str | None = None
    message: tuple[str, str] | None = None


def admit_many(
    client: OmniRedis, config: CoreModuleConfig, batch: Sequence[Asked]
) -> list[Admission]:
    """`admit` for every request of `batch` in one step (`scripts/admit_many.lua`): all
    of them are admitted, recorded and published (with their entries and messages), or
    none is. A repeat is an `Admission` with `repeat` set (nothing done for it); a
    conflict raises `RequestConflictError`, a pool that cannot take all of its
    requests `QueueFullError`, and nothing of the batch is written. Every request has
    an entry, or none has; every request with an entry has a message, or none has."""
    if not batch:
        return []
    per = 2 + (batch[0].entry is not None) + (batch[0].message is not None)
    if any(2 + (a.entry is not None) + (a.message is not None) != per for a in batch):
        raise ValueError("a batch records (and publishes) every request, or none")
    if per == 3 and batch[0].message is not None:
        raise ValueError("a message is published with its ledger entry")
    space = keyspace(config.key_prefix)
    script_keys = [space.ledger_open()]
    ttl_s = int(config.result_expires)
    script_args: list[Any] = [time.time(), ttl_s, ttl_s, per]
    for asked in batch:
        if not asked.admission_id:
            raise ValueError("admission_id must not be empty")
        limit = (current_limit(config) if asked.enforce else 0) if asked.counted else -1
        script_keys += [space.admitted(asked.queue), space.request_fingerprint(asked.admission_id)]
        entry, message = asked.entry, asked.message
        if entry is not None:
            script_keys.append(space.ledger(entry.task_id))
        if message is not None:
            script_keys.append(message[0])
        script_args += [asked.admission_id, limit, asked.fingerprint or ""]
        script_args += _entry_args(entry) + [message[1] if message else ""]
    found = client.scripts.admit_many(keys=script_keys, args=script_args)
    return _admitted_batch(config, batch, [int(v) for v in found])


def _entry_args(entry: ledger.Entry | None) -> list[Any]:
    """ARGV j=4..8 of a request in `scripts/admit_many.lua`."""
    if entry is None:
        return ["", "", "", "", ""]
    return [entry.task_id, entry.task, entry.args, entry.kwargs, entry.options]


def _admitted_batch(
    config: CoreModuleConfig, batch: Sequence[Asked], reply: list[int]
) -> list[Admission]:
    """The admissions of an accepted batch, or the error of a refused one."""
    if reply[0] == CONFLICT:
        raise RequestConflictError(batch[reply[1] - 1].admission_id)
    if reply[0] == FULL:
        index, size, adding = reply[1:4]
        queue = batch[index - 1].queue
        raise QueueFullError(
            f"pool {pool_name(queue, config)!r} (queue {queue!r}) is full: {size} requests "
            f"admitted, max_queue_size={current_limit(config)}, and the batch adds {adding}; "
            f"none of its {len(batch)} requests enqueued"
        )
    found = []
    for asked, status in zip(batch, reply[1:], strict=True):
        if status == REPEAT:
            found.append(Admission(asked.queue, asked.admission_id, added=False, repeat=True))
            continue
        recorded = asked.entry.task_id if asked.entry else None
        fingerprinted = bool(asked.fingerprint)
        found.append(
            Admission(
                asked.queue, asked.admission_id, status == 1, recorded, fingerprinted=fingerprinted
            )
        )
    return found


def undo_many(client: OmniRedis, queues: Iterable[str], admissions: Iterable[Admission]) -> None:
    """A batch whose publish failed: give back what each admission took
    (`Admission.undo`; the pools of `queues`), in one round trip."""
    done = [a for a in admissions if not a.repeat]
    added = [a.admission_id for a in done if a.added]
    recorded = [a.recorded for a in done if a.recorded]
    fingerprinted = [
        client.keyspace.request_fingerprint(a.admission_id) for a in done if a.fingerprinted
    ]
    pipe = client.pipeline(transaction=False)
    if added:
        for name in pool_sets(client.keyspace, queues):
            pipe.zrem(name, *added)
    if recorded:
        pipe.zrem(client.keyspace.ledger_open(), *recorded)
        pipe.delete(*(client.keyspace.ledger(i) for i in recorded))
    if fingerprinted:
        pipe.delete(*fingerprinted)
    pipe.execute()


def release(client: OmniRedis, queues: Iterable[str], admission_ids: Iterable[str]) -> None:
    """The requests ended: they leave the count of every pool of `queues` (the config's
    `pool_queues()`; idempotent)."""
    ids = [i for i in admission_ids if i]
    if not ids:
        return
    pipe = client.pipeline(transaction=False)
    for name in pool_sets(client.keyspace, queues):
        pipe.zrem(name, *ids)
    pipe.execute()


def count(client: OmniRedis, queue: str) -> int:
    """How many requests the pool of `queue` holds admitted."""
    return int(client.zcard(client.keyspace.admitted(queue)))


def admitted_before(client: OmniRedis, queue: str, before: float, limit: int = 1000) -> list[str]:
    """Ids admitted to the pool of `queue` before `before` (oldest first)."""
    return list(client.zrangebyscore(client.keyspace.admitted(queue), "-inf", before, 0, limit))


def pool_sets(space: KeySpace, queues: Iterable[str]) -> list[str]:
    return [space.admitted(q) for q in queues]


def pool_name(queue: str, config: CoreModuleConfig) -> str:
    """'ar', 'diffusion' or 'speech' for a pool's queue; the queue itself otherwise."""
    named = {pool.queue: name for name, pool in config.pools_by_name().items()}
    return named.get(queue, queue)


def current_limit(config: CoreModuleConfig) -> int:
    """The limit for this context: a scheduler's own, else `config`'s."""
    override = _limit.get()
    return override if override is not None else config.scheduler.max_queue_size


@contextmanager
def max_queue_size(limit: int) -> Iterator[None]:
    """Admit with `limit` instead of the config's within this context."""
    token = _limit.set(limit)
    try:
        yield
    finally:
        _limit.reset(token)


def unlimited() -> AbstractContextManager[None]:
    """Admit without a limit within this context: a lost request published again was
    admitted when it was first accepted."""
    return max_queue_size(0)


def final_task_id(task_id: str, options: dict[str, Any]) -> str:
    """The id a publish is admitted under: its chain's last task's, else its own.

    Celery keeps a chain's later stages in the `chain` option, last stage first.
    """
    for step in (options.get("chain") or [])[:1]:
        found = _signature_id(step)
        if found:
            return found
    return task_id


def _signature_id(step: Any) -> str | None:
    opts = step.get("options") if isinstance(step, dict) else getattr(step, "options", None)
    task_id = (opts or {}).get("task_id")
    return task_id if isinstance(task_id, str) and task_id else None


class ReleaseBatch:
    """A worker's releases, sent together every `interval_s` in one round trip.

    A release per finished task is on the hot path of every task; batching keeps that
    path free of Redis and holds a place at most `interval_s` longer. A failed flush
    keeps the ids for the next one; `flush()` on shutdown sends what is left (and the
    reaper reconciles anything a dead worker never sent). `release` sends a set of ids
    (`release` with the worker's client and pool queues).
    """

    def __init__(self, release: Callable[[set[str]], None], interval_s: float = 0.25) -> None:
        self.release = release
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._thread: threading.Thread | None = None
        self._outage = Outage("admission releases", log)

    def add(self, admission_ids: Iterable[str]) -> None:
        with self._lock:
            self._pending.update(i for i in admission_ids if i)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="omni-releases", daemon=True
                )
                self._thread.start()

    def flush(self) -> None:
        with self._lock:
            ids, self._pending = self._pending, set()
        if not ids:
            return
        if not self._outage.run(self.release, ids):  # kept for the next flush
            with self._lock:
                self._pending |= ids

    def _loop(self) -> None:
        while True:
            time.sleep(self._outage.pause(self.interval_s))
            self.flush()
