"""Worker lifecycle: load engines before the worker reports ready, beat a heartbeat into
Redis, and on SIGTERM abort in-flight requests so their messages go back to the queue.

Connected at import of `omni_tasks`; the engine code (torch) is imported only inside
the handlers, i.e. only in worker processes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any

from celery import signals
from celery.worker.control import inspect_command

from omni_tasks import cache_directory, keys
from omni_tasks.config import get_config
from omni_tasks.counters import counters
from omni_tasks.redis_client import get_redis

log = logging.getLogger(__name__)
HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_TTL_S = 20


class _WorkerState:
    hostname: str = ""
    queues: list[str] = []
    stages: list[str] = []
    pool: str = ""
    concurrency: int = 0
    stop_beating = threading.Event()


state = _WorkerState()


def _stages_for(queues: list[str]) -> list[str]:
    config = get_config()
    stages = []
    if config.ar.queue in queues:
        stages.append("ar")
    if config.diffusion.queue in queues:
        stages.append("dit")
    return stages


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    worker = sender
    state.hostname = worker.hostname
    state.queues = sorted(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
    state.stages = _stages_for(state.queues)
    state.pool = getattr(worker.pool_cls, "__module__", str(worker.pool_cls)).rsplit(".", 1)[-1]
    state.concurrency = int(worker.concurrency or 0)
    if state.pool != "prefork":
        _load_engines()


@signals.celeryd_after_setup.connect
def _on_after_setup(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """A diffusion worker also consumes its own queue (cache-affinity routing)."""
    if "dit" in state.stages:
        from omni_tasks.celery_app import pool_queue

        instance.app.amqp.queues.select_add(pool_queue(keys.worker_queue(state.hostname)))


@signals.worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    _load_engines()


def _load_engines() -> None:
    from workers.runtime import runtime

    started = time.perf_counter()
    runtime.start(state.stages)
    log.warning(
        "omni-tasks worker %s serving %s (stages %s) ready in %.1fs",
        state.hostname,
        state.queues,
        state.stages,
        time.perf_counter() - started,
    )


@signals.worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    _load_revocations()
    state.stop_beating.clear()
    threading.Thread(target=_beat, name="omni-heartbeat", daemon=True).start()


def _load_revocations() -> None:
    """Requests cancelled while this worker was not running: Celery's in-memory revoked
    list only hears live broadcasts, so seed it from the flags kept in Redis."""
    from celery.worker import state as worker_state

    prefix = keys.revoked("")
    try:
        for key in get_redis().scan_iter(match=prefix + "*", count=1000):
            worker_state.revoked.add(key[len(prefix) :])
    except Exception:
        log.warning("could not load revocations from Redis", exc_info=True)


def _beat() -> None:
    key = keys.worker(state.hostname)
    info = {
        "hostname": state.hostname,
        "queues": json.dumps(state.queues),
        "stages": json.dumps(state.stages),
        "pool": state.pool,
        "concurrency": state.concurrency,
        "pid": os.getpid(),
        "started": time.time(),
    }
    beats = 0
    while not state.stop_beating.is_set():
        beats += 1
        if beats % 2 == 1 and "dit" in state.stages:
            try:
                cache_directory.sweep_dead_workers(get_config().diffusion.queue)
            except Exception:
                log.warning("cache directory sweep failed", exc_info=True)
        try:
            client = get_redis()
            pipe = client.pipeline(transaction=True)
            pipe.hset(key, mapping={**info, **_cache_figures(), "beat": time.time()})
            pipe.expire(key, HEARTBEAT_TTL_S)
            pipe.execute()
        except Exception:
            log.warning("heartbeat to Redis failed", exc_info=True)
        state.stop_beating.wait(HEARTBEAT_INTERVAL_S)


def _loaded_runtime() -> Any | None:
    """This process's worker runtime if the engine side was ever imported; never imports
    it (a producer process must not pull torch in)."""
    return getattr(sys.modules.get("workers.runtime"), "runtime", None)


def _loaded_dit_cache() -> Any | None:
    runtime = _loaded_runtime()
    return None if runtime is None else runtime.built_dit_cache


def _cache_figures() -> dict[str, Any]:
    """The worker's DiT cache size, for `get_status()` (0 when it has none)."""
    cache = _loaded_dit_cache()
    if cache is None:
        return {"dit_cache_bytes": 0, "dit_cache_entries": 0, "dit_cache_max_bytes": 0}
    stats = cache.stats()
    return {
        "dit_cache_bytes": int(stats["bytes"]),
        "dit_cache_entries": int(stats["entries"]),
        "dit_cache_max_bytes": int(stats["max_bytes"]),
    }


@inspect_command(name="dit_cache")
def _dit_cache_command(_state: Any, **_: Any) -> dict[str, Any]:
    """`app.control.broadcast("dit_cache", reply=True)`: the keys this worker's DiT
    cache really holds, and its figures (what the Redis directory must mirror)."""
    cache = _loaded_dit_cache()
    if cache is None:
        return {"keys": [], "stats": {}}
    return {"keys": sorted(cache.keys()), "stats": cache.stats()}


@signals.worker_shutting_down.connect
def _on_shutting_down(**_: Any) -> None:
    # Called inside a signal handler: do the work on a thread.
    threading.Thread(target=_stop_engines, name="omni-stop", daemon=True).start()


def _stop_engines() -> None:
    state.stop_beating.set()
    runtime = _loaded_runtime()
    if runtime is not None:
        runtime.stop()


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    _stop_engines()
    counters.flush()
    try:
        get_redis().delete(keys.worker(state.hostname))
        cache_directory.clear_worker(state.hostname)
    except Exception:
        log.warning("could not clear the heartbeat key", exc_info=True)
