"""The worker lifecycle (`workers.lifecycle.hooks`) with real worker processes started
and stopped by the tests: engines loaded before the pool serves (priority order once it
starts), revocations made while no worker ran, a warm shutdown that hands work back,
and the engine a pool's config picks.

The redelivery cap, which the handler enforces, is in `tests/workers/test_handlers.py`."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import clean_redis, start_ready_workers
from helpers import KEYS, eventually

from omni_tasks import (
    OmniScheduler,
    SchedulerConfig,
    SchedulerType,
    create_diffusion_request,
    generate_image,
    generate_text,
)
from omni_tasks.coordination import keys
from omni_tasks.coordination.client import get_redis

pytestmark = pytest.mark.slow
TIMEOUT = 300


@pytest.fixture()
def clean(tiny_models):
    clean_redis()
    yield
    clean_redis()


def started_at(result: dict) -> float:
    return float(result["timings"]["started_at"])


def test_high_priority_runs_first_once_the_pool_starts(clean, run_dir) -> None:
    # The diffusion pool is stopped: 20 low requests, then 1 high one.
    lows = [
        generate_image.delay(
            prompt=f"low {i}", width=32, height=32, steps=1, seed=i, priority="low"
        )
        for i in range(20)
    ]
    high = generate_image.delay(prompt="high", width=32, height=32, steps=1, priority="high")
    # One slot, so the order of starts is the order the queue hands messages out.
    (worker,) = start_ready_workers(["diffusion"], run_dir / "logs", extra_args=["-c", "1"])
    try:
        high_result = high.get(TIMEOUT)
        low_results = [r.get(TIMEOUT) for r in lows]
    finally:
        worker.stop()
    assert all(started_at(high_result) < started_at(r) for r in low_results)
    low_starts = [started_at(r) for r in low_results]
    assert low_starts == sorted(low_starts)  # FIFO within a priority level


def test_removed_request_is_skipped_and_next_request_is_by_policy(clean, run_dir) -> None:
    async def schedule() -> tuple[OmniScheduler, list]:
        scheduler = OmniScheduler(SchedulerConfig(scheduler_type=SchedulerType.PRIORITY))
        reqs = [
            create_diffusion_request(f"r{i}", width=32, height=32, steps=1, priority=p)
            for i, p in enumerate(["low", "normal", "high", "low"])
        ]
        for r in reqs:
            assert await scheduler.schedule_request(r)
        assert scheduler.get_queue_size() == 4
        nxt = await scheduler.get_next_request()
        assert nxt is not None and nxt.request_id == reqs[2].request_id  # the high one
        assert await scheduler.remove_request(reqs[0].request_id)
        return scheduler, reqs

    scheduler, reqs = asyncio.run(schedule())
    (worker,) = start_ready_workers(["diffusion"], run_dir / "logs")
    try:

        async def finish() -> list:
            return [await scheduler.process_request(r) for r in reqs[1:]]

        done = asyncio.run(finish())
        assert [d["request_id"] for d in done] == [r.request_id for r in reqs[1:]]
        from celery.result import AsyncResult

        removed = AsyncResult(reqs[0].request_id)
        assert eventually(lambda: removed.state == "REVOKED", 30, 0.1), removed.state
        assert not get_redis().exists(KEYS.deliveries(reqs[0].request_id))
        # The worker discarded it and counted it for the pool.
        counted = eventually(lambda: get_redis().hget(KEYS.stats("diffusion"), "cancelled"))
        assert int(counted or 0) == 1
    finally:
        worker.stop()
    assert scheduler.get_queue_size() == 0


def test_warm_shutdown_hands_running_requests_back(clean, run_dir) -> None:
    (worker,) = start_ready_workers(["ar"], run_dir / "logs")
    results = [
        generate_text.delay(prompt=f"long story {i}", max_tokens=1900, seed=i) for i in range(6)
    ]
    started = eventually(lambda: all(r.state == "STARTED" for r in results), 60)
    assert started, [r.state for r in results]
    began = time.monotonic()
    code = worker.stop(timeout_s=60)
    stop_s = time.monotonic() - began
    assert code == 0
    assert stop_s < 30, f"warm shutdown took {stop_s:.1f}s"
    unfinished = [r for r in results if r.state != "SUCCESS"]
    assert unfinished, "requests finished before the shutdown; make them longer"
    waiting = sum(get_redis().llen(k) for k in keys.queue_keys("ar"))
    assert waiting == len(unfinished)  # handed back, not lost
    (second,) = start_ready_workers(["ar"], run_dir / "logs")
    try:
        for r in results:
            value = r.get(TIMEOUT)
            assert value["usage"]["completion_tokens"] > 0
    finally:
        second.stop()


def test_transformers_engine_pool(clean, run_dir) -> None:
    """`ar.engine: transformers`, the lighter engine, behind the same queue and task."""
    (worker,) = start_ready_workers(
        ["ar"], run_dir / "logs", env={"OMNI_AR__ENGINE": "transformers"}
    )
    try:
        results = [
            generate_text.delay(prompt=f"batch {i}", max_tokens=8, temperature=0) for i in range(4)
        ]
        values = [r.get(TIMEOUT) for r in results]
    finally:
        worker.stop()
    assert {v["engine"] for v in values} == {"transformers"}
    assert all(v["usage"]["completion_tokens"] == 8 for v in values)
