"""`OmniScheduler`: the async API over the shared queues, on a real Redis with no worker
running (so everything it schedules stays queued). Results of real runs:
tests/integration/test_end_to_end.py."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest
from helpers import DIT_QUEUE, KEYS, where, write_heartbeat

from omni_tasks import (
    CacheConfig,
    ConfigError,
    CoreScheduler,
    OmniScheduler,
    ProcessingStage,
    QueueFullError,
    RequestTimeoutError,
    SchedulerConfig,
    SchedulerError,
    SchedulerType,
    create_diffusion_request,
    create_multimodal_request,
    create_text_request,
    get_config,
)
from omni_tasks.scheduling import HybridScheduler, PriorityScheduler
from omni_tasks.tasks.definitions import generate_text

PRIORITY = SchedulerConfig(scheduler_type=SchedulerType.PRIORITY)


@pytest.mark.parametrize("scheduler_type", list(SchedulerType), indirect=True)
def test_omni_scheduler_routes_with_its_own_policy(redis_client, scheduler_type) -> None:
    # The process config says `scheduler_type`; this scheduler is configured as PRIORITY.
    scheduler = OmniScheduler(SchedulerConfig(scheduler_type=SchedulerType.PRIORITY))
    request = create_text_request("x", priority="low")
    assert asyncio.run(scheduler.schedule_request(request))
    assert where(redis_client, request.request_id) == ("ar", 9)


def test_core_scheduler_is_omni_scheduler() -> None:
    assert CoreScheduler is OmniScheduler


def test_configs_default_to_the_process_config_and_are_validated() -> None:
    scheduler = OmniScheduler()
    assert scheduler.get_config() == get_config().scheduler
    assert scheduler.scheduler.policy.scheduler_type is get_config().scheduler.scheduler_type
    assert isinstance(OmniScheduler(PRIORITY).scheduler, PriorityScheduler)
    with pytest.raises(ConfigError) as info:
        OmniScheduler(SchedulerConfig(max_queue_size=0))
    assert info.value.field == "scheduler.max_queue_size"
    with pytest.raises(ConfigError) as info:
        OmniScheduler(cache_config=CacheConfig(compression_ratio=2))
    assert info.value.field == "cache.compression_ratio"


def test_schedule_enqueues_once_and_counts_from_redis(redis_client) -> None:
    scheduler = OmniScheduler(PRIORITY)
    text = create_text_request("t", priority="high")
    image = create_diffusion_request("i", priority="normal")
    multi = create_multimodal_request("m", priority="low")

    async def run() -> None:
        for request in (text, image, multi):
            assert await scheduler.schedule_request(request)
        assert not await scheduler.schedule_request(text)  # already scheduled here

    asyncio.run(run())
    assert where(redis_client, text.request_id) == ("ar", 0)
    assert where(redis_client, image.request_id) == (DIT_QUEUE, 6)
    # A MULTIMODAL request waits as its AR stage; the DiT stage is sent by the AR worker.
    assert where(redis_client, multi.request_id + ".prompt") == ("ar", 9)
    assert scheduler.get_queue_size() == 3
    assert scheduler.get_status()["stats"]["total_requests"] == 3


def test_get_next_request_hands_out_waiting_requests_in_policy_order(redis_client) -> None:
    scheduler = OmniScheduler(PRIORITY)
    requests = [create_text_request(p, priority=p) for p in ("low", "normal", "high")]

    async def run() -> list[str]:
        for request in requests:
            await scheduler.schedule_request(request)
        order = []
        while (request := await scheduler.get_next_request()) is not None:
            assert request.processing_stage is ProcessingStage.PREPROCESSING
            order.append(request.prompt)
        return order

    assert asyncio.run(run()) == ["high", "normal", "low"]


def test_queue_full_is_refused_before_sending(redis_client) -> None:
    scheduler = OmniScheduler(SchedulerConfig(max_queue_size=2))
    a, b, c = (create_text_request(p) for p in "abc")

    async def run() -> None:
        assert await scheduler.schedule_request(a)
        assert await scheduler.schedule_request(b)
        with pytest.raises(QueueFullError):
            await scheduler.schedule_request(c)

    asyncio.run(run())
    assert scheduler.get_queue_size() == 2  # c was not sent
    assert scheduler.scheduler.get_queue_size() == 2  # nor kept in-process
    assert scheduler.get_status()["stats"]["failed_requests"] == 1
    # The bound counts every producer's messages, not only this scheduler's.
    other = OmniScheduler(SchedulerConfig(max_queue_size=2))
    with pytest.raises(QueueFullError):
        asyncio.run(other.schedule_request(create_text_request("d")))


def test_remove_request_revokes_it(redis_client) -> None:
    scheduler = OmniScheduler()
    request = create_multimodal_request("m")

    async def run() -> tuple[bool, bool]:
        await scheduler.schedule_request(request)
        return (
            await scheduler.remove_request(request.request_id),
            await scheduler.remove_request("never-scheduled"),
        )

    known, unknown = asyncio.run(run())
    assert (known, unknown) == (True, False)
    assert request.processing_stage is ProcessingStage.CANCELLED
    for task_id in (request.request_id, request.request_id + ".prompt"):
        assert redis_client.exists(KEYS.revoked(task_id)), task_id
    assert redis_client.exists(KEYS.revoked("never-scheduled"))  # revoked all the same
    assert asyncio.run(scheduler.get_next_request()) is None


def test_process_request_times_out_without_workers(redis_client) -> None:
    scheduler = OmniScheduler()
    request = create_text_request("nobody serves this")
    with pytest.raises(RequestTimeoutError, match=request.request_id):
        asyncio.run(scheduler.process_request(request, timeout=0.3))
    assert request.processing_stage is ProcessingStage.FAILED
    assert request.errors and "not done" in request.errors[0]
    assert where(redis_client, request.request_id)[0] == "ar"  # it was scheduled first
    assert scheduler.get_status()["stats"]["failed_requests"] == 1


def test_update_config_switches_the_policy_and_keeps_waiting_requests(
    redis_client, use_config
) -> None:
    scheduler = OmniScheduler(SchedulerConfig(scheduler_type=SchedulerType.FIFO))
    requests = [create_text_request(p, priority=p) for p in ("low", "normal", "high")]

    async def run() -> list[str]:
        for request in requests:
            await scheduler.schedule_request(request)
        scheduler.update_config(SchedulerConfig(scheduler_type=SchedulerType.HYBRID))
        order = []
        while (request := await scheduler.get_next_request()) is not None:
            order.append(request.prompt)
        return order

    assert asyncio.run(run()) == ["high", "normal", "low"]
    assert isinstance(scheduler.scheduler, HybridScheduler)
    assert scheduler.get_config().scheduler_type is SchedulerType.HYBRID
    assert scheduler.core_config.scheduler.scheduler_type is SchedulerType.HYBRID
    with pytest.raises(ConfigError):
        scheduler.update_config(SchedulerConfig(timeout_seconds=0))
    assert scheduler.get_config().scheduler_type is SchedulerType.HYBRID  # unchanged
    scheduler.update_cache_config(CacheConfig(max_memory_gib=2))
    assert scheduler.core_config.cache.max_memory_gib == 2
    with pytest.raises(ConfigError):
        scheduler.update_cache_config(CacheConfig(max_memory_gib=0))


def test_start_stop_and_shutdown() -> None:
    scheduler = OmniScheduler()

    async def run() -> None:
        await scheduler.start()
        assert scheduler.get_status()["running"] is True
        with pytest.raises(SchedulerError, match="already running"):
            await scheduler.start()
        await scheduler.stop(timeout=0.1)
        assert scheduler.get_status()["running"] is False
        await scheduler.stop()  # stopping twice is harmless
        await scheduler.start()
        await scheduler.shutdown()
        assert scheduler._background == []

    asyncio.run(run())


def test_status_metrics_and_health_without_workers(redis_client) -> None:
    scheduler = OmniScheduler(SchedulerConfig(max_queue_size=10))
    asyncio.run(scheduler.schedule_request(create_text_request("x", priority="low")))
    status = scheduler.get_status()
    assert status["queue_size"] == 1 and status["queues"]["ar"][0] == 1
    assert status["processed_requests"] == 0 and status["failed_requests"] == 0
    assert status["resource_status"] == {"workers": [], "used_bytes": 0, "budget_bytes": 0}
    assert set(status["pools"]) == {"ar", "diffusion", "speech"}
    metrics = scheduler.get_metrics()
    assert metrics["queue_utilization"] == pytest.approx(0.1)
    assert metrics["cache_hit_rate"] == 0.0 and metrics["memory_utilization"] == 0.0
    assert metrics["throughput"] == 0.0  # nothing done in the window
    health = scheduler.get_health_status()
    assert health["healthy"] is False
    # Only the pool with work waiting lacks a worker.
    assert health["issues"] == ["no live worker consumes queue 'ar' (1 waiting)"]
    assert health["recommendations"] == ["start one: celery -A omni_tasks worker -Q ar"]


def test_status_shows_each_workers_resource_status(redis_client) -> None:
    status = {"device": "cuda:0", "total_bytes": 80, "budget_bytes": 64, "used_bytes": 60}
    write_heartbeat(
        redis_client,
        "diffusion-1@h",
        {
            "hostname": "diffusion-1@h",
            "queues": '["diffusion"]',
            "beat": time.time(),
            "resource_status": json.dumps({**status, "running": 2, "batch": 2}),
        },
    )
    write_heartbeat(
        redis_client, "ar-1@h", {"hostname": "ar-1@h", "queues": '["ar"]', "beat": time.time()}
    )
    scheduler = OmniScheduler()
    resources = scheduler.get_status()["resource_status"]
    assert [w["hostname"] for w in resources["workers"]] == ["ar-1@h", "diffusion-1@h"]
    assert resources["workers"][0]["resource_status"] is None  # no figures in its beat
    assert resources["workers"][1]["resource_status"]["batch"] == 2
    assert (resources["used_bytes"], resources["budget_bytes"]) == (60, 64)
    assert scheduler.get_metrics()["memory_utilization"] == pytest.approx(60 / 64)
    health = scheduler.get_health_status()
    assert health["issues"] == ["worker diffusion-1@h uses 94% of its device memory budget"]


def test_update_config_reaches_plain_delay(redis_client, use_config) -> None:
    use_config(replace(get_config(), scheduler=SchedulerConfig()))  # FIFO: level 0
    scheduler = OmniScheduler()
    first = generate_text.delay(prompt="before", priority="low")
    scheduler.update_config(PRIORITY)
    second = generate_text.delay(prompt="after", priority="low")
    assert where(redis_client, first.id) == ("ar", 0)
    assert where(redis_client, second.id) == ("ar", 9)  # the next message follows
    assert get_config().scheduler == PRIORITY


def test_a_scheduler_takes_and_updates_the_config_of_the_app_it_sends_through(
    redis_client,
) -> None:
    """Given no config, the app's context's (attached here, not the process's); an update
    switches that context, so plain `.delay()` follows and the process config stays."""
    from omni_tasks import app

    process = get_config()
    app.omni.attached = replace(process, scheduler=SchedulerConfig(), key_prefix="omni")
    try:
        scheduler = OmniScheduler()
        assert scheduler.core_config.scheduler.scheduler_type is SchedulerType.FIFO
        scheduler.update_config(PRIORITY)
        sent = generate_text.delay(prompt="after", priority="low")
        assert where(redis_client, sent.id) == ("ar", 9)
        assert app.omni.config.scheduler == PRIORITY
        assert get_config() is process
    finally:
        app.omni.attached = None


def test_start_samples_every_metrics_interval_unless_disabled(redis_client) -> None:
    def samples_after_start(config) -> int:
        async def run() -> None:
            scheduler = OmniScheduler(core_config=config)
            await scheduler.start()
            await asyncio.sleep(2.5)  # the time whose samples are counted
            await scheduler.shutdown()

        redis_client.delete(KEYS.metrics_samples())
        asyncio.run(run())
        return redis_client.zcard(KEYS.metrics_samples())

    config = replace(get_config(), metrics_interval=1)
    assert samples_after_start(config) >= 2
    assert samples_after_start(replace(config, enable_health_checks=False)) >= 2
    quiet = replace(config, enable_metrics=False, enable_health_checks=False)
    assert samples_after_start(quiet) == 0
