"""Cluster figures read back from Redis: queue depths per level (workers' own queues
count for the diffusion pool), pool counters, live workers' heartbeats, and health."""

from __future__ import annotations

import json
from dataclasses import replace

from redis import Redis

from omni_tasks import get_config
from omni_tasks.config import SchedulerConfig
from omni_tasks.coordination import keys
from omni_tasks.coordination.monitoring import (
    ClusterSnapshot,
    PoolStats,
    health_of,
    queue_depths,
    read_snapshot,
    total_queued,
)


def beat(client: Redis, hostname: str, queues: list[str], **figures: object) -> None:
    """A heartbeat hash with the fields the worker side writes."""
    info = {
        "hostname": hostname,
        "queues": json.dumps(queues),
        "stages": json.dumps(["dit"] if "diffusion" in queues else ["ar"]),
        "pool_type": "threads",
        "concurrency": 2,
        "pid": 1234,
        "started": 1.0,
        "beat": 2.0,
        **figures,
    }
    client.hset(keys.worker(hostname), mapping=info)
    client.expire(keys.worker(hostname), 30)


def test_queue_depths_per_level(redis_client) -> None:
    assert queue_depths() == {
        "ar": dict.fromkeys(range(10), 0),
        "diffusion": dict.fromkeys(range(10), 0),
    }
    redis_client.lpush(keys.queue_key("ar", 0), "m1", "m2")
    redis_client.lpush(keys.queue_key("ar", 9), "m3")
    redis_client.lpush(keys.queue_key("diffusion", 6), "m4")
    depths = queue_depths()
    assert depths["ar"][0] == 2 and depths["ar"][9] == 1 and sum(depths["ar"].values()) == 3
    assert depths["diffusion"][6] == 1 and sum(depths["diffusion"].values()) == 1
    assert total_queued() == 4


def test_workers_own_queues_count_for_the_diffusion_pool(redis_client) -> None:
    redis_client.lpush(keys.queue_key("diffusion", 6), "m1")
    redis_client.lpush(keys.queue_key(keys.worker_queue("w1@h"), 6), "m2", "m3")
    redis_client.lpush(keys.queue_key(keys.worker_queue("w2@h"), 0), "m4")
    depths = queue_depths()
    assert depths["diffusion"][6] == 3 and depths["diffusion"][0] == 1
    assert sum(depths["ar"].values()) == 0
    assert total_queued() == 4


def test_queue_depths_follow_the_configured_queue_names(redis_client) -> None:
    config = get_config()
    renamed = replace(
        config,
        ar=replace(config.ar, queue="text-pool"),
        diffusion=replace(config.diffusion, queue="dit-pool"),
    )
    redis_client.lpush(keys.queue_key("text-pool", 3), "m1")
    redis_client.lpush(keys.queue_key("ar", 3), "not counted")
    depths = queue_depths(renamed)
    assert set(depths) == {"text-pool", "dit-pool"} and depths["text-pool"][3] == 1


def test_read_snapshot_parses_counters_and_heartbeats(redis_client) -> None:
    redis_client.hset(
        keys.stats("ar"),
        mapping={
            "processed": 7,
            "failed": 1,
            "expired": 4,
            "cancelled": 5,
            "rejected": 2,
            "run_s_sum": 3.5,
            "queued_s_sum": 0.5,
        },
    )
    redis_client.hset(keys.stats("diffusion"), mapping={"processed": 3})
    beat(
        redis_client, "diffusion-2@h", ["diffusion"], dit_cache_bytes=100, dit_cache_max_bytes=1000
    )
    beat(redis_client, "ar-1@h", ["ar"])
    beat(redis_client, "diffusion-1@h", ["diffusion"], dit_cache_bytes=50, dit_cache_max_bytes=1000)
    redis_client.lpush("ar", "m1")
    snap = read_snapshot()
    assert snap.pools["ar"] == PoolStats(
        processed=7,
        failed=1,
        expired=4,
        cancelled=5,
        rejected=2,
        run_s_sum=3.5,
        queued_s_sum=0.5,
    )
    assert snap.pools["diffusion"] == PoolStats(processed=3)
    assert (snap.processed, snap.failed, snap.queued) == (10, 1, 1)
    assert [w["hostname"] for w in snap.workers] == ["ar-1@h", "diffusion-1@h", "diffusion-2@h"]
    assert snap.workers[0]["queues"] == ["ar"] and snap.workers[1]["stages"] == ["dit"]
    assert (snap.dit_cache_bytes, snap.dit_cache_max_bytes) == (150, 2000)
    assert [w["hostname"] for w in snap.workers_of("diffusion")] == [
        "diffusion-1@h",
        "diffusion-2@h",
    ]
    assert snap.workers_of("elsewhere") == []


def test_read_snapshot_of_an_empty_cluster(redis_client) -> None:
    snap = read_snapshot()
    assert snap.workers == [] and snap.queued == 0 and snap.processed == 0
    assert snap.pools == {"ar": PoolStats(), "diffusion": PoolStats()}


def snapshot(
    queued: dict[str, int],
    workers: list[list[str]],
    pools: dict[str, PoolStats] | None = None,
) -> ClusterSnapshot:
    return ClusterSnapshot(
        queues={q: {0: n} for q, n in queued.items()},
        pools=pools or {"ar": PoolStats(), "diffusion": PoolStats()},
        workers=[{"hostname": f"w{i}", "queues": qs} for i, qs in enumerate(workers)],
    )


def test_health_names_pools_without_workers() -> None:
    config = get_config()
    issues, advice = health_of(snapshot({"ar": 0, "diffusion": 2}, []), config)
    assert issues == [
        "no live worker consumes queue 'ar' (0 waiting)",
        "no live worker consumes queue 'diffusion' (2 waiting)",
    ]
    assert advice == [
        "start one: celery -A omni_tasks worker -Q ar",
        "start one: celery -A omni_tasks worker -Q diffusion",
    ]
    issues, _ = health_of(snapshot({"ar": 0, "diffusion": 0}, [["ar"], ["diffusion"]]), config)
    assert issues == []


def test_health_names_full_queues() -> None:
    config = replace(get_config(), scheduler=SchedulerConfig(max_queue_size=10))
    both = [["ar"], ["diffusion"]]
    assert health_of(snapshot({"ar": 4, "diffusion": 4}, both), config) == ([], [])
    issues, advice = health_of(snapshot({"ar": 5, "diffusion": 4}, both), config)
    assert issues == ["queues hold 9 of max_queue_size=10"]
    assert advice == ["add workers or raise scheduler.max_queue_size"]


def test_health_names_failing_pools() -> None:
    config = get_config()
    both = [["ar"], ["diffusion"]]
    failing = {
        "ar": PoolStats(processed=8, failed=2),
        "diffusion": PoolStats(processed=100, failed=10),
    }
    issues, advice = health_of(snapshot({"ar": 0, "diffusion": 0}, both, failing), config)
    assert issues == ["pool 'ar' failed 2 of 10 requests"]  # 10 % of diffusion is not > 10 %
    assert advice == ["read the 'ar' workers' logs and the rejected list"]
    few = {"ar": PoolStats(processed=1, failed=8), "diffusion": PoolStats()}
    assert health_of(snapshot({"ar": 0, "diffusion": 0}, both, few), config) == ([], [])
