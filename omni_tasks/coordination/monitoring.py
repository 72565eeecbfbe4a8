"""Cluster figures read from Redis: queue depths, live workers, per-pool counters, health.

Every producer and worker writes to the same keys, so any process sees the whole
system; nothing here depends on which process scheduled what. Pools are named by
their queue.

With a RabbitMQ broker the queues are not Redis lists: their depths come from
RabbitMQ (a passive declare), as one count per queue under `UNKNOWN_LEVEL`, since it
does not say at which priorities messages wait.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kombu import Connection

from omni_tasks.config import CoreModuleConfig, get_config
from omni_tasks.coordination import keys
from omni_tasks.coordination.cache_directory import hit_rate, own_queue_keys
from omni_tasks.coordination.client import get_redis, redacted
from omni_tasks.coordination.rejections import MAX_RECORDS

log = logging.getLogger(__name__)
#: The level under which a queue's count is reported when the broker gives no levels.
UNKNOWN_LEVEL = -1
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


def queue_depths(config: CoreModuleConfig | None = None) -> dict[str, dict[int, int]]:
    """Messages waiting per pool and priority level (0 highest). The diffusion pool's
    figure includes its workers' own queues (cache-affinity routing puts work there)."""
    config = config or get_config()
    client = get_redis()
    if not config.broker_is_redis:
        return _broker_depths(config, client)
    depths = _level_counts(client, [config.ar.queue, config.diffusion.queue])
    own = depths[config.diffusion.queue]
    for key, _, level in own_queue_keys(client):
        own[level] += int(client.llen(key))
    return depths


def highest_waiting_level(queues: list[str]) -> int | None:
    """The highest priority (lowest level, 0..9) with a message waiting in any of
    `queues`, or None when they are all empty: one round trip. None as well with a
    RabbitMQ broker, which tells how many messages wait but not at which priority."""
    if not get_config().broker_is_redis:
        return None
    depths = _level_counts(get_redis(), queues)
    waiting = [level for levels in depths.values() for level, n in levels.items() if n]
    return min(waiting) if waiting else None


def _level_counts(client: Any, queues: list[str]) -> dict[str, dict[int, int]]:
    """Messages per priority level of each queue, read in one pipeline."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for key in keys.queue_keys(queue):
            pipe.llen(key)
    counts = iter(pipe.execute())
    return {q: {level: int(next(counts)) for level in keys.PRIORITY_STEPS} for q in queues}


class _BrokerQueues:
    """One connection to a non-Redis broker, shared by the process's threads, to count
    the messages waiting in its queues."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        self._url = ""

    def counts(self, url: str, queues: list[str]) -> dict[str, int | None]:
        """Messages per queue: 0 for a queue never declared, None when unreachable."""
        with self._lock:
            try:
                if self._connection is None or self._url != url:
                    self._close()
                    self._connection, self._url = Connection(url, connect_timeout=3), url
                connection = self._connection.ensure_connection(max_retries=1)
                return {q: self._count(connection, q) for q in queues}
            except Exception as exc:
                log.warning("cannot count queued messages at %s: %s", redacted(url), exc)
                self._close()
                return dict.fromkeys(queues)

    @staticmethod
    def _count(connection: Connection, queue: str) -> int:
        channel = connection.channel()
        try:
            return int(channel.queue_declare(queue, passive=True).message_count)
        except connection.channel_errors:  # not declared: nothing was ever sent to it
            return 0
        finally:
            try:
                channel.close()
            except Exception:  # the broker closes a channel whose passive declare failed
                pass

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.release()
            self._connection = None


_broker_queues = _BrokerQueues()


def _broker_depths(config: CoreModuleConfig, client: Any) -> dict[str, dict[int, int]]:
    """Depths from a non-Redis broker, one count per pool under `UNKNOWN_LEVEL` (an
    unreachable broker gives empty levels: unknown)."""
    dit = config.diffusion.queue
    own = [keys.worker_queue(w) for w in _live_workers_of(client, "dit")]
    counts = _broker_queues.counts(config.broker, [config.ar.queue, dit, *own])
    pools = {config.ar.queue: [config.ar.queue], dit: [dit, *own]}
    depths: dict[str, dict[int, int]] = {}
    for pool, queues in pools.items():
        found = [counts[q] for q in queues if counts[q] is not None]
        depths[pool] = {UNKNOWN_LEVEL: sum(found)} if found else {}  # type: ignore[misc]
    return depths


def _live_workers_of(client: Any, stage: str) -> list[str]:
    """Hostnames of the live workers running `stage`, from their heartbeats."""
    found = []
    for key in client.scan_iter(match=keys.worker("") + "*", count=200):
        if stage in json.loads(client.hget(key, "stages") or "[]"):
            found.append(key[len(keys.worker("")) :])
    return found


def total_queued(config: CoreModuleConfig | None = None) -> int:
    """Messages waiting in every queue, all levels."""
    return sum(sum(levels.values()) for levels in queue_depths(config).values())


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
    for queue in (config.ar.queue, config.diffusion.queue):
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
    for key in client.scan_iter(match=keys.worker("") + "*", count=200):
        info = client.hgetall(key)
        if not info:
            continue
        for name in ("queues", "stages"):
            info[name] = json.loads(info.get(name) or "[]")
        workers.append(info)
    workers.sort(key=lambda w: w.get("hostname", ""))
    return ClusterSnapshot(queues=queue_depths(config), pools=pools, workers=workers)


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
    for worker in snapshot.workers:
        res = worker_resources(worker) or {}
        used, budget = int(res.get("used_bytes", 0)), int(res.get("budget_bytes", 0))
        if budget and used >= MEMORY_FULL_RATIO * budget:
            host = worker.get("hostname", "?")
            issues.append(f"worker {host} uses {used / budget:.0%} of its device memory budget")
            advice.append(f"add workers to {host}'s pool or lower its batch or cache size")


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
