"""One read of the cluster (`omni_tasks.coordination.snapshots`): pool counters, live
workers' heartbeats and the models they serve, and the depths, from Redis."""

from __future__ import annotations

import json
import time
from dataclasses import fields, replace
from typing import Any

from helpers import KEYS, write_heartbeat
from redis import Redis

from omni_tasks import get_config
from omni_tasks.config import ModelEntry
from omni_tasks.coordination import keys, worker_index
from omni_tasks.coordination.health import health_of
from omni_tasks.coordination.snapshots import (
    PoolStats,
    model_servers,
    read_snapshot,
    unserved_models,
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
        "beat": time.time(),
        **figures,
    }
    write_heartbeat(client, hostname, info)


def test_read_snapshot_parses_counters_and_heartbeats(redis_client) -> None:
    redis_client.hset(
        KEYS.stats("ar"),
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
    redis_client.hset(KEYS.stats("diffusion"), mapping={"processed": 3})
    beat(
        redis_client, "diffusion-2@h", ["diffusion"], dit_cache_bytes=100, dit_cache_max_bytes=1000
    )
    beat(redis_client, "ar-1@h", ["ar"])
    beat(redis_client, "diffusion-1@h", ["diffusion"], dit_cache_bytes=50, dit_cache_max_bytes=1000)
    redis_client.lpush("ar", "m1")
    snap = read_snapshot(redis_client, get_config())
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
    snap = read_snapshot(redis_client, get_config())
    assert snap.workers == [] and snap.queued == 0 and snap.processed == 0
    assert snap.pools == {"ar": PoolStats(), "diffusion": PoolStats(), "speech": PoolStats()}


def test_models_no_live_worker_serves_are_named(redis_client, use_config) -> None:
    config = get_config()
    use_config(replace(config, models={"flux-b": ModelEntry(), "flux-c": ModelEntry()}))
    beat(redis_client, "a@h", ["diffusion"], models=json.dumps({"dit": "tiny-flux"}))
    beat(redis_client, "b@h", ["diffusion"], models=json.dumps({"dit": "flux-b"}))
    beat(redis_client, "t@h", ["ar"], models=json.dumps({"ar": "tiny-llama"}))
    snap = read_snapshot(redis_client, get_config())
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
    issues, advice = health_of(read_snapshot(redis_client, get_config()), get_config())
    assert issues == ["no live worker serves model 'flux-c' (2 waiting)"]
    assert advice == [
        "start one: OMNI_DIFFUSION__MODEL=flux-c celery -A omni_tasks worker -Q diffusion"
    ]


def test_pool_stats_read_every_field_of_the_stats_hash() -> None:
    raw = {f.name: "2" for f in fields(PoolStats)}
    stats = PoolStats.from_hash(raw)
    assert all(getattr(stats, f.name) == 2 for f in fields(PoolStats))
    assert isinstance(stats.run_s_sum, float) and isinstance(stats.processed, int)
    assert PoolStats.from_hash({}) == PoolStats()


def test_a_snapshot_reads_the_worker_index_once(redis_client, monkeypatch) -> None:
    beat(redis_client, "d@h", ["diffusion"])
    redis_client.lpush(keys.queue_key(KEYS.worker_queue("d@h"), 6), "m1")
    reads: list[str] = []
    for name in ("read", "listed", "live"):
        real = getattr(worker_index, name)

        def counted(*args: Any, _name: str = name, _real: Any = real, **kwargs: Any) -> Any:
            reads.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(worker_index, name, counted)
    snap = read_snapshot(redis_client, get_config())
    assert reads == ["read"]  # the workers and their own queues' depths from one read
    assert [w["hostname"] for w in snap.workers] == ["d@h"] and snap.queues["diffusion"][6] == 1
