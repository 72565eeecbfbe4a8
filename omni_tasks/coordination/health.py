"""Health rules: issues and what to do about them, from a snapshot of the cluster and
the recent window of its counters.

A rule on the state now (a queue near `max_queue_size`, a pool with work and no live
worker, a stale heartbeat, a model nobody serves, device memory near its budget) holds
while the state does; a rule on rates (failures, rejections, the DiT cache's hit rate)
reads the recent window only, so an old burst ages out.
"""

from __future__ import annotations

import time

from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination.counter_window import Window, window_seconds
from omni_tasks.coordination.keyspace import keyspace
from omni_tasks.coordination.snapshots import ClusterSnapshot, unserved_models, worker_resources

#: Health thresholds.
QUEUE_FULL_RATIO = 0.8
MEMORY_FULL_RATIO = 0.9
FAILURE_RATIO = 0.1
MIN_OUTCOMES = 10
LOW_HIT_RATE = 0.2
MIN_LOOKUPS = 10


def health_of(
    snapshot: ClusterSnapshot, config: CoreModuleConfig, window: Window | None = None
) -> tuple[list[str], list[str]]:
    """Issues and recommendations from the cluster's state now and, given a `window`,
    from what happened in it (so an old burst of failures ages out)."""
    issues: list[str] = []
    advice: list[str] = []
    _workers_health(snapshot, config, issues, advice)
    limit = config.scheduler.max_queue_size
    for queue, levels in snapshot.queues.items():
        waiting = sum(levels.values())
        if waiting >= QUEUE_FULL_RATIO * limit:
            issues.append(f"queue {queue!r} holds {waiting} of max_queue_size={limit}")
            advice.append(f"add {queue!r} workers or raise scheduler.max_queue_size")
    if window is not None:
        _window_health(window, config, issues, advice)
    return issues, advice


def _workers_health(
    snapshot: ClusterSnapshot, config: CoreModuleConfig, issues: list[str], advice: list[str]
) -> None:
    """Pools with work and no live worker, stale heartbeats, device memory near budget."""
    now = time.time()
    stale = {
        w.get("hostname", "?"): now - float(w["beat"])
        for w in snapshot.workers
        if w.get("beat") and now - float(w["beat"]) > config.worker_timeout
    }
    for host, age in stale.items():
        issues.append(
            f"worker {host} last beat {age:.0f}s ago (worker_timeout={config.worker_timeout})"
        )
        advice.append(f"check worker {host}: its process and its connection to Redis")
    for queue, levels in snapshot.queues.items():
        waiting = sum(levels.values())
        live = [w for w in snapshot.workers_of(queue) if w.get("hostname") not in stale]
        if waiting and not live:
            issues.append(f"no live worker consumes queue {queue!r} ({waiting} waiting)")
            advice.append(f"start one: celery -A omni_tasks worker -Q {queue}")
    _models_health(snapshot, config, issues, advice)
    for worker in snapshot.workers:
        res = worker_resources(worker) or {}
        used, budget = int(res.get("used_bytes", 0)), int(res.get("budget_bytes", 0))
        if budget and used >= MEMORY_FULL_RATIO * budget:
            host = worker.get("hostname", "?")
            issues.append(f"worker {host} uses {used / budget:.0%} of its device memory budget")
            advice.append(f"add workers to {host}'s pool or lower its batch or cache size")


def _models_health(
    snapshot: ClusterSnapshot, config: CoreModuleConfig, issues: list[str], advice: list[str]
) -> None:
    """A registered model with requests waiting and no live worker serving it (one with
    nothing waiting is only listed: `unserved_models`)."""
    pool = config.diffusion.queue
    for model in unserved_models(snapshot):
        waiting = sum(snapshot.models.get(model, {}).values())
        if waiting:
            issues.append(f"no live worker serves model {model!r} ({waiting} waiting)")
            advice.append(
                f"start one: OMNI_DIFFUSION__MODEL={model} celery -A omni_tasks worker -Q {pool}"
            )


def _window_health(
    window: Window, config: CoreModuleConfig, issues: list[str], advice: list[str]
) -> None:
    """Failure rates, rejected messages and the DiT hit rate over the recent window."""
    span = f"in the last {window_seconds(config):.0f}s"
    for queue, stats in window.pools.items():
        bad = stats.failed + stats.rejected
        done = stats.processed + bad
        if done >= MIN_OUTCOMES and bad / done > FAILURE_RATIO:
            issues.append(f"pool {queue!r} failed {bad} of {done} requests {span}")
            advice.append(f"read the {queue!r} workers' logs and the rejected list")
    if window.rejected:
        issues.append(f"{window.rejected} messages rejected {span}")
        rejected = keyspace(config.key_prefix).rejected()
        advice.append(f"read the rejected list (Redis list {rejected!r}) for their reasons")
    lookups = window.cache_hits + window.cache_misses
    if not config.diffusion.cache_affinity and lookups >= MIN_LOOKUPS:
        rate = window.cache_hits / lookups
        if rate < LOW_HIT_RATE:
            issues.append(f"DiT cache hit rate {rate:.0%} {span}, with cache_affinity off")
            advice.append("set diffusion.cache_affinity: true so repeats reach their cache")
