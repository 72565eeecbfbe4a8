"""Health rules (`omni_tasks.coordination.health`) over a snapshot of the cluster and
the recent window of its counters."""

from __future__ import annotations

import json
import time
from dataclasses import replace

from omni_tasks import get_config
from omni_tasks.config import SchedulerConfig
from omni_tasks.coordination.counter_window import Window
from omni_tasks.coordination.health import health_of
from omni_tasks.coordination.snapshots import (
    ClusterSnapshot,
    PoolStats,
    memory_figures,
    worker_resources,
)


def snapshot(
    queued: dict[str, int],
    workers: list[list[str]],
    **figures: object,
) -> ClusterSnapshot:
    return ClusterSnapshot(
        queues={q: {0: n} for q, n in queued.items()},
        pools={"ar": PoolStats(), "diffusion": PoolStats()},
        workers=[
            {"hostname": f"w{i}", "queues": qs, "beat": time.time(), **figures}
            for i, qs in enumerate(workers)
        ],
    )


BOTH = [["ar"], ["diffusion"]]


def window(**figures: object) -> Window:
    pools = figures.pop("pools", {"ar": PoolStats(), "diffusion": PoolStats()})
    return Window(seconds=60.0, pools=pools, **figures)  # type: ignore[arg-type]


def test_health_names_pools_with_work_and_no_live_worker() -> None:
    config = get_config()
    issues, advice = health_of(snapshot({"ar": 0, "diffusion": 2}, []), config)
    assert issues == ["no live worker consumes queue 'diffusion' (2 waiting)"]
    assert advice == ["start one: celery -A omni_tasks worker -Q diffusion"]
    assert health_of(snapshot({"ar": 0, "diffusion": 0}, []), config) == ([], [])
    assert health_of(snapshot({"ar": 3, "diffusion": 2}, BOTH), config) == ([], [])


def test_health_names_stale_heartbeats_and_does_not_count_them_live() -> None:
    config = replace(get_config(), worker_timeout=30)
    snap = snapshot({"ar": 1, "diffusion": 0}, BOTH)
    snap.workers[0]["beat"] = time.time() - 45
    issues, advice = health_of(snap, config)
    assert issues == [
        "worker w0 last beat 45s ago (worker_timeout=30)",
        "no live worker consumes queue 'ar' (1 waiting)",
    ]
    assert advice[0] == "check worker w0: its process and its connection to Redis"


def test_health_names_queues_near_their_limit() -> None:
    config = replace(get_config(), scheduler=SchedulerConfig(max_queue_size=10))
    assert health_of(snapshot({"ar": 7, "diffusion": 7}, BOTH), config) == ([], [])
    issues, advice = health_of(snapshot({"ar": 8, "diffusion": 7}, BOTH), config)
    assert issues == ["queue 'ar' holds 8 of max_queue_size=10"]
    assert advice == ["add 'ar' workers or raise scheduler.max_queue_size"]


def test_health_names_device_memory_near_budget() -> None:
    config = get_config()
    status = {"device": "cpu", "budget_bytes": 1000, "used_bytes": 899, "running": 1}
    ok = snapshot({"ar": 0, "diffusion": 0}, BOTH, resource_status=json.dumps(status))
    assert health_of(ok, config) == ([], [])
    assert memory_figures(ok) == (1798, 2000)
    full = snapshot({"ar": 0}, [["ar"]], resource_status=json.dumps({**status, "used_bytes": 900}))
    issues, _ = health_of(full, config)
    assert issues == ["worker w0 uses 90% of its device memory budget"]
    assert worker_resources({"hostname": "old"}) is None  # heartbeats without the field
    assert memory_figures(snapshot({"ar": 0}, [["ar"]])) == (0, 0)


def test_health_judges_failures_over_the_window_only() -> None:
    config = get_config()
    calm = snapshot({"ar": 0, "diffusion": 0}, BOTH)
    failing = {"ar": PoolStats(processed=8, failed=1, rejected=1), "diffusion": PoolStats()}
    issues, advice = health_of(calm, config, window(pools=failing))
    assert issues == ["pool 'ar' failed 2 of 10 requests in the last 60s"]
    assert advice == ["read the 'ar' workers' logs and the rejected list"]
    few = {"ar": PoolStats(processed=1, failed=8), "diffusion": PoolStats()}
    assert health_of(calm, config, window(pools=few)) == ([], [])  # under MIN_OUTCOMES
    # Without a window only the state now counts: all-time counters never age.
    calm.pools["ar"] = PoolStats(failed=1000)
    assert health_of(calm, config) == ([], [])


def test_health_names_rejections_and_a_low_hit_rate_without_affinity() -> None:
    config = get_config()
    calm = snapshot({"ar": 0, "diffusion": 0}, BOTH)
    issues, _ = health_of(calm, config, window(rejected=3))
    assert issues == ["3 messages rejected in the last 60s"]
    cold = window(cache_hits=1, cache_misses=9)
    assert health_of(calm, config, cold) == ([], [])  # affinity on: nothing to advise
    off = replace(config, diffusion=replace(config.diffusion, cache_affinity=False))
    issues, advice = health_of(calm, off, cold)
    assert issues == ["DiT cache hit rate 10% in the last 60s, with cache_affinity off"]
    assert advice == ["set diffusion.cache_affinity: true so repeats reach their cache"]
