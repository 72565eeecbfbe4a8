"""The worker's heartbeat: a Redis hash, renewed every few seconds, that says it is alive
and what it serves, beside the set of task ids it holds (reserved or running). Both
expire when the worker stops beating: live diffusion workers then clear the dead one's
DiT cache entries and move its own queue back to the pool, and the reaper gives its
unacked messages back (`workers.lifecycle.reaper`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from omni_tasks.coordination import cache_directory, worker_index
from omni_tasks.coordination.outage import Outage
from omni_tasks.coordination.worker_index import HEARTBEAT_INTERVAL_S, HEARTBEAT_TTL_S
from workers import task_context
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)
__all__ = ["HEARTBEAT_INTERVAL_S", "HEARTBEAT_TTL_S", "Heartbeat", "held_task_ids"]


class Heartbeat:
    """Beats for one worker from a daemon thread, from `start()` until `stop()`."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kinds: list[str] = []  # the index's kinds: the identity's stages, at start
        self._held_written = True  # whether a held set may exist (a restart's old one)
        self._beats = 0

    def start(self) -> None:
        self._kinds = worker_index.kinds_of(self.runtime.identity.stages)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="omni-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def clear(self) -> None:
        """Remove this worker's heartbeat and DiT cache entries (a clean exit)."""
        hostname, keys = self.runtime.hostname, self.runtime.keys
        try:
            client = self.runtime.redis
            client.delete(keys.worker(hostname), keys.held(hostname))
            cache_directory.clear_worker(client, hostname)
            worker_index.leave(
                client, worker_index.kinds_of(self.runtime.identity.stages), hostname
            )
        except Exception:
            log.warning("could not clear the heartbeat key", exc_info=True)

    def info(self) -> dict[str, Any]:
        """What the heartbeat hash holds, apart from the time of the beat."""
        identity, config = self.runtime.identity, self.runtime.config
        return {
            "hostname": identity.hostname,
            "queues": json.dumps(identity.queues),
            "stages": json.dumps(identity.stages),
            # The model of each stage it runs: what the HTTP API lists (`GET /v1/models`).
            "models": json.dumps({s: config.pool_for(s).model for s in identity.stages}),
            "pool_type": identity.pool_type,
            "concurrency": identity.concurrency,
            "pid": os.getpid(),
            # Which run of this hostname beats: a run claim names it (`coordination.runs`).
            "instance": self.runtime.instance,
            "started": time.time(),
        }

    def _loop(self) -> None:
        """Beat every `HEARTBEAT_INTERVAL_S`; while Redis is away, retry on the outage's
        backoff, capped at the interval so the first beat follows Redis's return."""
        key = self.runtime.keys.worker(self.runtime.hostname)
        info = self.info()
        sweeps = "dit" in self.runtime.identity.stages
        outage = Outage("heartbeat", log, max_s=HEARTBEAT_INTERVAL_S)
        sweep = Outage("cache directory sweep", log)
        beats, last = 0, time.monotonic()
        while not self._stop.is_set():
            beats += 1
            # The beat first: however long the sweep takes, it never delays a beat.
            if outage.run(self._beat, key, info):
                last = _late_beat_warning(last)
            if sweeps and beats % 2 == 1:
                sweep.run(
                    cache_directory.sweep_dead_workers,
                    self.runtime.redis,
                    self.runtime.config.diffusion.queue,
                )
            self._stop.wait(outage.pause(HEARTBEAT_INTERVAL_S))

    def _beat(self, key: str, info: dict[str, Any]) -> None:
        """One beat: the hash (its expiry renewed every other beat), the index entry,
        and the held set. Idle, that is two or three commands in one round trip (2.5 per
        beat on average); the held set is rewritten in a
        transaction (a reader never sees it half written) only while it has members or
        had them at the last beat."""
        figures: dict[str, Any] = dict(self.runtime.dit_cache_figures())
        resources = self.runtime.resource_status()
        if resources is not None:
            figures["resource_status"] = json.dumps(resources)
        held = held_task_ids()
        rewrite = bool(held) or self._held_written
        pipe = self.runtime.redis.pipeline(transaction=rewrite)
        now = time.time()
        pipe.hset(key, mapping={**info, **figures, "beat": now})
        self._beats += 1
        if self._beats % 2 == 1:  # every other beat: the hash outlives two intervals
            pipe.expire(key, HEARTBEAT_TTL_S)
        keys = self.runtime.keys
        worker_index.beat(pipe, keys, self._kinds, self.runtime.hostname, now)
        if rewrite:
            held_key = keys.held(self.runtime.hostname)
            pipe.delete(held_key)
            if held:
                pipe.sadd(held_key, *held)
                pipe.expire(held_key, HEARTBEAT_TTL_S)
        pipe.execute()
        self._held_written = bool(held)


def _late_beat_warning(last: float) -> float:
    """Say so when a beat came so late that the hash may have expired in between (the
    worker then looked dead to the API and the reaper); returns the beat's time."""
    now = time.monotonic()
    if now - last > HEARTBEAT_TTL_S / 2:
        log.warning(
            "heartbeat: %.1f s since the last beat (the hash lives %d s)",
            now - last,
            HEARTBEAT_TTL_S,
        )
    return now


def held_task_ids() -> list[str]:
    """The messages this worker holds: running in one of its threads, or reserved on its
    live broker channel. A request reserved on a channel that was closed (a lost broker
    connection) cannot be acked any more and may never run; it is not held, so the
    reaper gives its message back."""
    from celery.worker import state

    held = set(task_context.running_task_ids())
    for request in list(state.reserved_requests):
        channel = getattr(getattr(request, "message", None), "channel", None)
        if request.id and not getattr(channel, "closed", False):
            held.add(request.id)
    return sorted(held)
