"""Prometheus metrics of the whole cluster, read from Redis on every scrape.

Every producer and worker writes its figures to Redis (queues, per-pool counters and
histograms, heartbeats, DiT cache counters), so one exporter anywhere covers them all
and a restart of it loses nothing. `registry()` is the process's registry: serve it
with `serve` (what `omni-tasks exporter` runs), or mount `wsgi_app()` in an HTTP API.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination.client import OmniRedis, client_for
from omni_tasks.coordination.counters import BATCH_BUCKETS, TIME_BUCKETS, read_histogram
from omni_tasks.coordination.depths import UNKNOWN_LEVEL
from omni_tasks.coordination.snapshots import (
    ClusterSnapshot,
    PoolStats,
    read_snapshot,
    worker_resources,
)
from omni_tasks.tasks.celery_app import app
from omni_tasks.tasks.context import producer_context

log = logging.getLogger(__name__)
#: The `PoolStats` counters, each an `outcome` of `omni_requests_total`.
OUTCOME_FIELDS = tuple(f for f in PoolStats.__dataclass_fields__ if not f.endswith("_sum"))
#: Heartbeat `resource_status` figures -> (metric, help); absent keys are skipped.
RESOURCE_GAUGES = {
    "used_bytes": ("omni_device_memory_used_bytes", "Device memory in use by the worker."),
    "budget_bytes": ("omni_device_memory_budget_bytes", "Device memory the worker may use."),
    "total_bytes": ("omni_device_memory_total_bytes", "Total memory of the worker's device."),
    "running": ("omni_worker_running_requests", "Requests the worker is running."),
    "batch": ("omni_worker_batch_size", "Requests in the worker's current step batch."),
}


def _app_config() -> CoreModuleConfig:
    """The config `omni_tasks.app` sends by now."""
    return producer_context(app).config


class ClusterCollector(Collector):
    """Reads Redis at each scrape; a Redis that does not answer gives `omni_redis_up 0`
    and nothing else, not a failed scrape. `config` gives the config of each scrape:
    by default the one `omni_tasks.app` sends by (`producer_context`), so a scrape
    follows a config changed since."""

    def __init__(self, config: Callable[[], CoreModuleConfig] | None = None) -> None:
        self._config = config or _app_config

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("omni_redis_up", "Whether the exporter could read Redis.")
        try:
            families = list(self._families(self._config()))
        except Exception as exc:
            log.warning("cannot read the cluster's figures from Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, config: CoreModuleConfig) -> Iterator[Metric]:
        client = client_for(config)
        snapshot = read_snapshot(client, config)
        pools = list(snapshot.pools)
        yield from _queue_families(snapshot, config.diffusion.queue)
        yield from _timing_families(client, pools)
        yield from _step_families(client, pools, config.diffusion.queue)
        yield from _worker_families(client, snapshot)
        yield from _redis_families(client.info())


def _redis_families(info: dict[str, Any]) -> Iterator[Metric]:
    """Redis's own load, from one INFO: what the capacity model of docs/operations.md
    ("Scaling out") is read against (Redis runs commands on one core)."""
    cpu = CounterMetricFamily(
        "omni_redis_cpu_seconds", "CPU seconds the Redis server has used (user + system)."
    )
    cpu.add_metric([], float(info.get("used_cpu_user", 0)) + float(info.get("used_cpu_sys", 0)))
    commands = CounterMetricFamily(
        "omni_redis_commands_processed", "Commands the Redis server has processed."
    )
    commands.add_metric([], float(info.get("total_commands_processed", 0)))
    clients = GaugeMetricFamily("omni_redis_connected_clients", "Connections to Redis.")
    clients.add_metric([], float(info.get("connected_clients", 0)))
    memory = GaugeMetricFamily("omni_redis_used_memory_bytes", "Memory Redis uses.")
    memory.add_metric([], float(info.get("used_memory", 0)))
    yield from (cpu, commands, clients, memory)


def _queue_families(snapshot: ClusterSnapshot, dit_pool: str) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "omni_queue_depth",
        "Messages waiting per pool and priority level (0 is served first).",
        labels=["pool", "level"],
    )
    for pool, levels in snapshot.queues.items():
        for level, count in sorted(levels.items()):
            depth.add_metric([pool, _level_label(level)], count)
    by_model = GaugeMetricFamily(
        "omni_model_queue_depth",
        "Messages waiting in each diffusion model's queue, per priority level (also "
        "counted in its pool's omni_queue_depth).",
        labels=["pool", "model", "level"],
    )
    for model, levels in snapshot.models.items():
        for level, count in sorted(levels.items()):
            by_model.add_metric([dit_pool, model, _level_label(level)], count)
    requests = CounterMetricFamily(
        "omni_requests", "Requests per pool and outcome.", labels=["pool", "outcome"]
    )
    for pool, stats in snapshot.pools.items():
        for outcome in OUTCOME_FIELDS:
            requests.add_metric([pool, outcome], getattr(stats, outcome))
    up = GaugeMetricFamily("omni_workers_up", "Live workers per pool.", labels=["pool"])
    for pool in snapshot.pools:
        up.add_metric([pool], len(snapshot.workers_of(pool)))
    yield from (depth, by_model, requests, up)


def _level_label(level: int) -> str:
    return "unknown" if level == UNKNOWN_LEVEL else str(level)


def _timing_families(client: OmniRedis, pools: list[str]) -> Iterator[Metric]:
    labels = ["pool", "type"]
    wait = HistogramMetricFamily(
        "omni_request_queue_wait_seconds",
        "Time from submission to the start of a successful run.",
        labels=labels,
    )
    run = HistogramMetricFamily(
        "omni_request_run_seconds", "Run time of successful requests.", labels=labels
    )
    pipe = client.pipeline(transaction=False)
    for pool in pools:
        pipe.hgetall(client.keyspace.timings(pool))
    for pool, raw in zip(pools, pipe.execute(), strict=True):
        for kind in sorted({field.partition(":")[0] for field in raw}):
            for family, name in ((wait, "queued_s"), (run, "run_s")):
                buckets, total, _ = read_histogram(raw, f"{kind}:{name}", TIME_BUCKETS)
                family.add_metric([pool, kind], buckets, total)
    yield from (wait, run)


def _step_families(client: OmniRedis, pools: list[str], stepping_pool: str) -> Iterator[Metric]:
    batch = HistogramMetricFamily(
        "omni_step_batch_size", "Requests per denoising step batch.", labels=["pool"]
    )
    preempted = CounterMetricFamily(
        "omni_preemptions",
        "Running requests paused for higher-ranked ones.",
        labels=["pool"],
    )
    pipe = client.pipeline(transaction=False)
    for pool in pools:
        pipe.hgetall(client.keyspace.step_stats(pool))
    for pool, raw in zip(pools, pipe.execute(), strict=True):
        if raw or pool == stepping_pool:
            buckets, total, _ = read_histogram(raw, "batch", BATCH_BUCKETS)
            batch.add_metric([pool], buckets, total)
            preempted.add_metric([pool], int(raw.get("preemptions", 0)))
    yield from (batch, preempted)


def _worker_families(client: OmniRedis, snapshot: ClusterSnapshot) -> Iterator[Metric]:
    """Per live worker: DiT cache counters and size, device memory, heartbeat age."""
    worker = ["worker"]
    hits = CounterMetricFamily(
        "omni_dit_cache_hits", "DiT cache hits per worker.", labels=["worker", "kind"]
    )
    misses = CounterMetricFamily(
        "omni_dit_cache_misses", "DiT cache misses per worker.", labels=["worker", "kind"]
    )
    sizes = {
        field: GaugeMetricFamily(f"omni_{field}", help_text, labels=worker)
        for field, help_text in (
            ("dit_cache_bytes", "Bytes held by the worker's DiT cache."),
            ("dit_cache_max_bytes", "The worker's DiT cache limit in bytes."),
            ("dit_cache_entries", "Entries in the worker's DiT cache."),
        )
    }
    resources = {
        field: GaugeMetricFamily(name, help_text, labels=["worker", "device"])
        for field, (name, help_text) in RESOURCE_GAUGES.items()
    }
    age = GaugeMetricFamily(
        "omni_worker_heartbeat_age_seconds", "Seconds since the worker's last beat.", labels=worker
    )
    names = [w.get("hostname", "") for w in snapshot.workers]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(client.keyspace.cache_worker_stats(name))
    now = time.time()
    for name, info, counts in zip(names, snapshot.workers, pipe.execute(), strict=True):
        for field, value in counts.items():
            outcome, _, kind = field.partition(":")
            family = hits if outcome == "hits" else misses if outcome == "misses" else None
            if family is not None:
                family.add_metric([name, kind], int(value))
        for field, family in sizes.items():
            family.add_metric([name], float(info.get(field) or 0))
        if info.get("beat"):
            age.add_metric([name], max(0.0, now - float(info["beat"])))
        _add_resources(resources, name, info)
    yield from (hits, misses, *sizes.values(), *resources.values(), age)


def _add_resources(families: dict[str, GaugeMetricFamily], worker: str, info: Any) -> None:
    """The figures of a heartbeat's `resource_status`, where it has one."""
    status = worker_resources(info)
    if not isinstance(status, dict):
        return
    device = str(status.get("device", ""))
    for field, family in families.items():
        value = status.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            family.add_metric([worker, device], value)


_registry: CollectorRegistry | None = None
_registry_lock = threading.Lock()


def registry() -> CollectorRegistry:
    """The process's registry holding the cluster collector (made on first use)."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = CollectorRegistry(auto_describe=False)
            _registry.register(ClusterCollector())
        return _registry


def wsgi_app() -> Callable[..., Any]:
    """A WSGI app serving the registry in the text format, for an HTTP API to mount."""
    return make_wsgi_app(registry())


def serve(port: int, addr: str = "0.0.0.0") -> tuple[WSGIServer, threading.Thread]:
    """Serve `/metrics` on `addr:port` from a daemon thread; `server.shutdown()` stops it."""
    return start_http_server(port, addr=addr, registry=registry())
