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
from dataclasses import dataclass, field
from typing import Any

from kombu import Connection

from omni_tasks.config import CoreModuleConfig, get_config
from omni_tasks.coordination import keys
from omni_tasks.coordination.cache_directory import own_queue_keys
from omni_tasks.coordination.client import get_redis, redacted

log = logging.getLogger(__name__)
#: The level under which a queue's count is reported when the broker gives no levels.
UNKNOWN_LEVEL = -1


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


def health_of(snapshot: ClusterSnapshot, config: CoreModuleConfig) -> tuple[list[str], list[str]]:
    """Issues and recommendations: pools without workers, full queues, failure rates."""
    issues: list[str] = []
    advice: list[str] = []
    for queue, levels in snapshot.queues.items():
        waiting = sum(levels.values())
        if not snapshot.workers_of(queue):
            issues.append(f"no live worker consumes queue {queue!r} ({waiting} waiting)")
            advice.append(f"start one: celery -A omni_tasks worker -Q {queue}")
    limit = config.scheduler.max_queue_size
    if snapshot.queued >= 0.9 * limit:
        issues.append(f"queues hold {snapshot.queued} of max_queue_size={limit}")
        advice.append("add workers or raise scheduler.max_queue_size")
    for queue, stats in snapshot.pools.items():
        done = stats.processed + stats.failed
        if done >= 10 and stats.failed / done > 0.1:
            issues.append(f"pool {queue!r} failed {stats.failed} of {done} requests")
            advice.append(f"read the {queue!r} workers' logs and the rejected list")
    return issues, advice
