"""The monitoring API against real pools: cluster-wide throughput over a recent window,
health that recovers once a burst of bad requests leaves the window, and the cleanup
that `start()` runs."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from celery.result import AsyncResult
from helpers import KEYS, eventually, eventually_async, publish_raw

from omni_tasks import OmniScheduler, create_text_request, get_config
from omni_tasks.tasks.definitions import generate_text

TIMEOUT = 120
BURST = 10


def fast_config():
    """A 1 s metrics interval: the recent window is 6 s, so recovery shows quickly."""
    return replace(get_config(), metrics_interval=1, cleanup_interval=1)


def test_health_recovers_after_a_burst_of_bad_requests(pools, redis_client) -> None:
    scheduler = OmniScheduler(core_config=fast_config())
    assert scheduler.get_health_status()["healthy"], scheduler.get_health_status()
    bad = [publish_raw("omni_tasks.generate_text", {"prompt": 5}, "ar") for _ in range(BURST)]
    for task_id in bad:  # the worker refuses each one: a failure result, a rejected record
        AsyncResult(task_id).get(TIMEOUT, propagate=False)
    sick = eventually(lambda: not (h := scheduler.get_health_status())["healthy"] and h, 10)
    assert sick, scheduler.get_health_status()
    assert f"{BURST} messages rejected in the last 6s" in sick["issues"]
    assert any(i.startswith("pool 'ar' failed") for i in sick["issues"])
    # Good requests go on; once the burst is older than the window, health recovers.
    started = time.monotonic()

    def recovered() -> dict | None:
        generate_text.delay(prompt="fine", max_tokens=2).get(TIMEOUT)
        health = scheduler.get_health_status()  # samples the counters as it goes
        return health if health["healthy"] else None

    healthy = eventually(recovered, 30, interval_s=0.5)
    assert healthy, scheduler.get_health_status()
    assert time.monotonic() - started >= 4  # not before the burst left the window
    assert redis_client.llen(KEYS.rejected()) == BURST  # the records are kept all the same


def test_throughput_is_cluster_wide_and_recent(pools) -> None:
    sampler = OmniScheduler(core_config=fast_config())
    sampler.get_metrics()  # the window's first sample
    results = [generate_text.delay(prompt=f"n{i}", max_tokens=2) for i in range(6)]
    for result in results:
        result.get(TIMEOUT)

    def recorded() -> dict | None:
        """Another instance, which scheduled nothing itself, reads the same window."""
        metrics = OmniScheduler(core_config=fast_config()).get_metrics()
        return metrics if metrics["throughput"] > 0 and metrics["window_seconds"] > 1 else None

    metrics = eventually(recorded)
    assert metrics, "no throughput recorded"
    assert metrics["window_seconds"] > 1
    done = metrics["throughput"] * metrics["window_seconds"]
    assert round(done) >= 6
    assert metrics["average_latency"] > 0
    assert OmniScheduler().get_status()["stats"]["processed_requests"] == 0  # not per instance


def test_start_runs_the_cleanup_of_finished_requests(pools) -> None:
    async def run() -> tuple[int, int]:
        scheduler = OmniScheduler(core_config=fast_config())
        await scheduler.start()
        request = create_text_request("clean me", max_tokens=2)
        await scheduler.schedule_request(request)
        held = scheduler.scheduler.get_queue_size()
        await asyncio.to_thread(AsyncResult(request.request_id).get, TIMEOUT)
        await eventually_async(lambda: scheduler.scheduler.get_queue_size() == 0)  # cleaned
        left = scheduler.scheduler.get_queue_size()
        await scheduler.shutdown()
        return held, left

    assert asyncio.run(run()) == (1, 0)
