"""Cluster figures read back from Redis: queue depths per level (workers' own queues and
the models' queues count for the diffusion pool; each model's on its own too), pool
counters, live workers' heartbeats and the models they serve, and health."""

from __future__ import annotations

import json
import time
from dataclasses import replace

from helpers import write_heartbeat
from redis import Redis

from omni_tasks import get_config
from omni_tasks.config import ModelEntry, SchedulerConfig
from omni_tasks.coordination import keys
from omni_tasks.coordination.monitoring import (
    ClusterSnapshot,
    Counters,
    PoolStats,
    Window,
    all_depths,
    health_of,
    memory_figures,
    model_depths,
    model_servers,
    queue_depths,
    read_snapshot,
    recent_window,
    record_sample,
    total_queued,
    unserved_models,
    worker_resources,
)
from omni_tasks.coordination.rejections import record_rejection


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
        "beat": time.time(),
        **figures,
    }
    write_heartbeat(client, hostname, info)


def test_queue_depths_per_level(redis_client) -> None:
    assert queue_depths() == {
        "ar": dict.fromkeys(range(10), 0),
        "diffusion": dict.fromkeys(range(10), 0),
        "speech": dict.fromkeys(range(10), 0),
    }
    redis_client.lpush(keys.queue_key("ar", 0), "m1", "m2")
    redis_client.lpush(keys.queue_key("ar", 9), "m3")
    redis_client.lpush(keys.queue_key("diffusion", 6), "m4")
    depths = queue_depths()
    assert depths["ar"][0] == 2 and depths["ar"][9] == 1 and sum(depths["ar"].values()) == 3
    assert depths["diffusion"][6] == 1 and sum(depths["diffusion"].values()) == 1
    assert total_queued() == 4


def test_workers_own_queues_count_for_the_diffusion_pool(redis_client) -> None:
    beat(redis_client, "w1@h", ["diffusion"])
    beat(redis_client, "w2@h", ["diffusion"])
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
        speech=replace(config.speech, queue="tts-pool"),
    )
    redis_client.lpush(keys.queue_key("text-pool", 3), "m1")
    redis_client.lpush(keys.queue_key("ar", 3), "not counted")
    depths = queue_depths(renamed)
    assert set(depths) == {"text-pool", "dit-pool", "tts-pool"} and depths["text-pool"][3] == 1


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
    assert snap.pools == {"ar": PoolStats(), "diffusion": PoolStats(), "speech": PoolStats()}


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


def test_recent_window_compares_with_the_oldest_sample_in_the_window(redis_client) -> None:
    config = replace(get_config(), metrics_interval=1)  # a 6 s window
    now = time.time()
    old = {"ar": PoolStats(processed=1, failed=50), "diffusion": PoolStats()}
    record_sample(Counters(now - 30, old))  # before the window: ignored
    record_sample(Counters(now - 4, {**old, "ar": PoolStats(processed=2, failed=50)}))
    redis_client.hset(keys.stats("ar"), mapping={"processed": 12, "failed": 51})
    redis_client.hset(keys.cache_stats("diffusion"), mapping={"hits:latents": 3})
    record_rejection("bad message", queue="ar")
    recent = recent_window(read_snapshot(config), config)
    assert recent.pools["ar"] == PoolStats(processed=10, failed=1, rejected=1)
    assert 3.9 < recent.seconds < 6 and recent.throughput == 10 / recent.seconds
    assert recent.rejected == 1
    assert redis_client.zcard(keys.metrics_samples()) == 3  # this call's sample added
    # A sample not seen before a window's start: nothing is known to be recent.
    redis_client.delete(keys.metrics_samples())
    fresh = recent_window(read_snapshot(config), config)
    assert fresh.seconds == 0 and fresh.processed == 0 and fresh.throughput == 0.0


def test_model_queues_count_for_their_pool_and_on_their_own(redis_client, use_config) -> None:
    config = get_config()
    use_config(replace(config, models={"flux-b": ModelEntry(), "flux-c": ModelEntry()}))
    redis_client.lpush(keys.queue_key("diffusion.tiny-flux", 6), "m1", "m2")
    redis_client.lpush(keys.queue_key("diffusion.flux-b", 0), "m3")
    redis_client.lpush(keys.queue_key("diffusion.unregistered", 0), "not counted")
    pools, models = all_depths()
    assert pools["diffusion"][6] == 2 and pools["diffusion"][0] == 1
    # The default video models are registered too (no worker serves them here).
    defaults = {"tiny-wan", "tiny-wan-i2v", "tiny-stable-audio"}
    assert set(models) == {"tiny-flux", "flux-b", "flux-c", *defaults}
    assert (sum(models["tiny-flux"].values()), models["flux-b"][0]) == (2, 1)
    assert sum(models["flux-c"].values()) == 0
    assert model_depths() == models and total_queued() == 3


def test_models_no_live_worker_serves_are_named(redis_client, use_config) -> None:
    config = get_config()
    use_config(replace(config, models={"flux-b": ModelEntry(), "flux-c": ModelEntry()}))
    beat(redis_client, "a@h", ["diffusion"], models=json.dumps({"dit": "tiny-flux"}))
    beat(redis_client, "b@h", ["diffusion"], models=json.dumps({"dit": "flux-b"}))
    beat(redis_client, "t@h", ["ar"], models=json.dumps({"ar": "tiny-llama"}))
    snap = read_snapshot()
    # The default video and audio models, unserved here.
    video = {"tiny-wan": [], "tiny-wan-i2v": [], "tiny-stable-audio": []}
    assert model_servers(snap) == {
        "tiny-flux": ["a@h"],
        "flux-b": ["b@h"],
        "flux-c": [],
        **video,
    }
    assert sorted(unserved_models(snap)) == sorted(["flux-c", *video])
    assert health_of(snap, get_config()) == ([], [])  # nothing waits for flux-c
    redis_client.lpush(keys.queue_key("diffusion.flux-c", 3), "m1", "m2")
    issues, advice = health_of(read_snapshot(), get_config())
    assert issues == ["no live worker serves model 'flux-c' (2 waiting)"]
    assert advice == [
        "start one: OMNI_DIFFUSION__MODEL=flux-c celery -A omni_tasks worker -Q diffusion"
    ]


def test_waiting_above_looks_only_at_the_better_levels(redis_client) -> None:
    from omni_tasks.coordination.depths import waiting_above

    own = keys.worker_queue("w1@h")
    redis_client.lpush(keys.queue_key(own, 5), "m")
    redis_client.lpush(keys.queue_key("diffusion", 9), "m")
    assert not waiting_above(["diffusion", own], 5)  # level 5 is not better than 5
    assert waiting_above(["diffusion", own], 6)
    assert not waiting_above(["diffusion"], 9) and not waiting_above([own], 0)
