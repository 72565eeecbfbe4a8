"""Cluster figures read from Redis: queue depths (`depths`, re-exported here), live
workers and the models they serve, per-pool counters, health.

Every producer and worker writes to the same keys, so any process sees the whole
system; nothing here depends on which process scheduled what. Pools are named by
their queue.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from omni_tasks.config import CoreModuleConfig, get_config
from omni_tasks.coordination import keys, worker_index
from omni_tasks.coordination.cache_directory import hit_rate
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.depths import UNKNOWN_LEVEL as UNKNOWN_LEVEL  # re-exported
from omni_tasks.coordination.depths import all_depths
from omni_tasks.coordination.depths import highest_waiting_level as highest_waiting_level
from omni_tasks.coordination.depths import model_depths as model_depths
from omni_tasks.coordination.depths import queue_depths as queue_depths
from omni_tasks.coordination.depths import total_queued as total_queued
from omni_tasks.coordination.depths import waiting_above as waiting_above
from omni_tasks.coordination.rejections import MAX_RECORDS

log = logging.getLogger(__name__)
#: Rates are judged over this many metrics intervals (60 s with the default 10 s).
WINDOW_INTERVALS = 6
#: Counter samples kept, whatever the window: the series stays small however many
#: processes sample it.
MAX_SAMPLES = 1000
MAX_SAMPLE_AGE_S = 3600
#: Health thresholds.
QUEUE_FULL_RATIO = 0.8
MEMORY_FULL_RATIO = 0.9
FAILURE_RATIO = 0.1
MIN_OUTCOMES = 10
LOW_HIT_RATE = 0.2
MIN_LOOKUPS = 10


@dataclass
class PoolStats:
    processed: int = 0
    failed: int = 0
    expired: int = 0
    cancelled: int = 0
    rejected: int = 0
    duplicates: int = 0
    restored: int = 0
    recovered: int = 0
    run_s_sum: float = 0.0
    queued_s_sum: float = 0.0


@dataclass
class ClusterSnapshot:
    queues: dict[str, dict[int, int]]
    pools: dict[str, PoolStats]
    workers: list[dict[str, Any]] = field(default_factory=list)
    #: Messages waiting per registered diffusion model (its queue), per level.
    models: dict[str, dict[int, int]] = field(default_factory=dict)

    @property
    def queued(self) -> int:
        return sum(sum(levels.values()) for levels in self.queues.values())

    @property
    def processed(self) -> int:
        return sum(p.processed for p in self.pools.values())

    @property
    def failed(self) -> int:
        return sum(p.failed for p in self.pools.values())

    @property
    def dit_cache_bytes(self) -> int:
        return sum(int(w.get("dit_cache_bytes", 0)) for w in self.workers)

    @property
    def dit_cache_max_bytes(self) -> int:
        return sum(int(w.get("dit_cache_max_bytes", 0)) for w in self.workers)

    def workers_of(self, queue: str) -> list[dict[str, Any]]:
        return [w for w in self.workers if queue in w.get("queues", [])]


def read_snapshot(config: CoreModuleConfig | None = None) -> ClusterSnapshot:
    config = config or get_config()
    client = get_redis()
    pools: dict[str, PoolStats] = {}
    for queue in config.pool_queues():
        raw = client.hgetall(keys.stats(queue))
        pools[queue] = PoolStats(
            processed=int(raw.get("processed", 0)),
            failed=int(raw.get("failed", 0)),
            expired=int(raw.get("expired", 0)),
            cancelled=int(raw.get("cancelled", 0)),
            rejected=int(raw.get("rejected", 0)),
            duplicates=int(raw.get("duplicates", 0)),
            restored=int(raw.get("restored", 0)),
            recovered=int(raw.get("recovered", 0)),
            run_s_sum=float(raw.get("run_s_sum", 0.0)),
            queued_s_sum=float(raw.get("queued_s_sum", 0.0)),
        )
    workers = []
    for info in worker_index.heartbeats(client, worker_index.live(client)):
        for name in ("queues", "stages"):
            info[name] = json.loads(info.get(name) or "[]")
        info["models"] = _json_object(info.get("models"))
        workers.append(info)
    workers.sort(key=lambda w: w.get("hostname", ""))
    queues, models = all_depths(config)
    return ClusterSnapshot(queues=queues, pools=pools, workers=workers, models=models)


def _json_object(raw: Any) -> dict[str, Any]:
    """A heartbeat's JSON object field (`models`: stage -> model), {} when unreadable."""
    try:
        found = json.loads(raw or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def model_servers(snapshot: ClusterSnapshot) -> dict[str, list[str]]:
    """Registered diffusion model -> the live workers serving it (their heartbeats'
    `models`), hostnames sorted; [] for a model none serves."""
    served: dict[str, list[str]] = {model: [] for model in snapshot.models}
    for worker in snapshot.workers:
        model = (worker.get("models") or {}).get("dit")
        if model is not None:
            served.setdefault(model, []).append(str(worker.get("hostname", "?")))
    return {model: sorted(hosts) for model, hosts in served.items()}


def worker_resources(worker: dict[str, Any]) -> dict[str, Any] | None:
    """The `resource_status` a worker's heartbeat carries (device, total_bytes,
    budget_bytes, used_bytes, cache_bytes, running, batch), or None without one."""
    raw = worker.get("resource_status")
    if isinstance(raw, dict):
        return raw
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def memory_figures(snapshot: ClusterSnapshot) -> tuple[int, int]:
    """(used, budget) device bytes summed over the workers that report them."""
    found = [r for r in map(worker_resources, snapshot.workers) if r]
    return (
        sum(int(r.get("used_bytes", 0)) for r in found),
        sum(int(r.get("budget_bytes", 0)) for r in found),
    )


@dataclass
class Counters:
    """The cluster's cumulative counters at one moment."""

    time: float
    pools: dict[str, PoolStats]
    cache_hits: int = 0
    cache_misses: int = 0


@dataclass
class Window:
    """What happened in the recent window: counter increases over `seconds` (0 when
    no earlier sample exists yet), and records pushed onto the rejected list."""

    seconds: float
    pools: dict[str, PoolStats]
    cache_hits: int = 0
    cache_misses: int = 0
    rejected: int = 0

    @property
    def processed(self) -> int:
        return sum(p.processed for p in self.pools.values())

    @property
    def throughput(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def window_seconds(config: CoreModuleConfig) -> float:
    return float(WINDOW_INTERVALS * config.metrics_interval)


def current_counters(snapshot: ClusterSnapshot, config: CoreModuleConfig) -> Counters:
    _, hits, misses = hit_rate(config.diffusion.queue)
    return Counters(time.time(), snapshot.pools, hits, misses)


def record_sample(counters: Counters) -> None:
    """Add `counters` to the shared series, trimmed by age and count."""
    member = json.dumps(
        {
            "t": counters.time,
            "pools": {q: asdict(p) for q, p in counters.pools.items()},
            "hits": counters.cache_hits,
            "misses": counters.cache_misses,
        }
    )
    pipe = get_redis().pipeline(transaction=True)
    pipe.zadd(keys.metrics_samples(), {member: counters.time})
    pipe.zremrangebyscore(keys.metrics_samples(), "-inf", counters.time - MAX_SAMPLE_AGE_S)
    pipe.zremrangebyrank(keys.metrics_samples(), 0, -MAX_SAMPLES - 1)
    pipe.execute()


def recent_window(snapshot: ClusterSnapshot, config: CoreModuleConfig) -> Window:
    """Sample the counters now, then compare them with the oldest sample of the window
    (any process's): counters only grow, so only their increase says what is recent."""
    now = current_counters(snapshot, config)
    record_sample(now)
    client = get_redis()
    since = now.time - window_seconds(config)
    oldest = client.zrangebyscore(keys.metrics_samples(), since, "+inf", start=0, num=1)
    base = json.loads(oldest[0]) if oldest else {"t": now.time, "pools": {}}
    pools = {q: _increase(p, base["pools"].get(q)) for q, p in now.pools.items()}
    records = client.lrange(keys.rejected(), 0, MAX_RECORDS - 1)
    rejected = sum(1 for r in records if float(json.loads(r).get("time", 0)) >= since)
    return Window(
        seconds=max(now.time - float(base["t"]), 0.0),
        pools=pools,
        cache_hits=max(now.cache_hits - int(base.get("hits", now.cache_hits)), 0),
        cache_misses=max(now.cache_misses - int(base.get("misses", now.cache_misses)), 0),
        rejected=rejected,
    )


def _increase(now: PoolStats, base: dict[str, Any] | None) -> PoolStats:
    """`now` minus `base`, field by field; a counter that went down (reset) counts 0."""
    if base is None:
        return PoolStats()
    return PoolStats(
        **{f.name: max(getattr(now, f.name) - base.get(f.name, 0), 0) for f in fields(now)}
    )


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


def unserved_models(snapshot: ClusterSnapshot) -> list[str]:
    """The registered diffusion models no live worker serves: their requests wait."""
    return [model for model, hosts in model_servers(snapshot).items() if not hosts]


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
        advice.append(f"read the rejected list (Redis list {keys.rejected()!r}) for their reasons")
    lookups = window.cache_hits + window.cache_misses
    if not config.diffusion.cache_affinity and lookups >= MIN_LOOKUPS:
        rate = window.cache_hits / lookups
        if rate < LOW_HIT_RATE:
            issues.append(f"DiT cache hit rate {rate:.0%} {span}, with cache_affinity off")
            advice.append("set diffusion.cache_affinity: true so repeats reach their cache")
