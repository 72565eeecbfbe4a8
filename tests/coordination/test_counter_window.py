"""The recent window (`omni_tasks.coordination.counter_window`): counter increases
since the oldest sample inside it, read without writing; a sample is written apart."""

from __future__ import annotations

import time
from dataclasses import replace

from helpers import KEYS

from omni_tasks import get_config
from omni_tasks.coordination.counter_window import (
    Counters,
    current_counters,
    read_window,
    record_sample,
    sample_window,
)
from omni_tasks.coordination.rejections import record_rejection
from omni_tasks.coordination.snapshots import PoolStats, read_snapshot


def test_the_window_compares_with_the_oldest_sample_in_the_window(redis_client) -> None:
    config = replace(get_config(), metrics_interval=1)  # a 6 s window
    now = time.time()
    old = {"ar": PoolStats(processed=1, failed=50), "diffusion": PoolStats()}
    record_sample(redis_client, Counters(now - 30, old))  # before the window: ignored
    record_sample(redis_client, Counters(now - 4, {**old, "ar": PoolStats(processed=2, failed=50)}))
    redis_client.hset(KEYS.stats("ar"), mapping={"processed": 12, "failed": 51})
    redis_client.hset(KEYS.cache_stats("diffusion"), mapping={"hits:latents": 3})
    record_rejection(redis_client, "bad message", queue="ar")
    now_counters = current_counters(redis_client, read_snapshot(redis_client, config), config)
    recent = read_window(redis_client, now_counters, config)
    assert redis_client.zcard(KEYS.metrics_samples()) == 2  # a read writes nothing
    assert recent.pools["ar"] == PoolStats(processed=10, failed=1, rejected=1)
    assert 3.9 < recent.seconds < 6 and recent.throughput == 10 / recent.seconds
    assert recent.rejected == 1
    assert (
        sample_window(redis_client, read_snapshot(redis_client, config), config).pools["ar"]
        == recent.pools["ar"]
    )
    assert redis_client.zcard(KEYS.metrics_samples()) == 3  # its sample added
    # A sample not seen before a window's start: nothing is known to be recent.
    redis_client.delete(KEYS.metrics_samples())
    fresh = sample_window(redis_client, read_snapshot(redis_client, config), config)
    assert fresh.seconds == 0 and fresh.processed == 0 and fresh.throughput == 0.0
