"""In-process schedulers: a bounded heap ordered by a policy; the five named classes fix
their policy; `create_scheduler` picks the class of the configured type."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from helpers import LARGE, SMALL

from omni_tasks import (
    DiffusionScheduler,
    FIFOScheduler,
    HybridScheduler,
    MultimodalScheduler,
    PriorityScheduler,
    QueueFullError,
    SchedulerConfig,
    SchedulerType,
    create_diffusion_request,
    create_scheduler,
    create_text_request,
    get_config,
)
from omni_tasks.requests import OmniRequest
from omni_tasks.scheduling import BaseScheduler, PolicyScheduler

NAMED = {
    SchedulerType.FIFO: FIFOScheduler,
    SchedulerType.PRIORITY: PriorityScheduler,
    SchedulerType.MULTIMODAL: MultimodalScheduler,
    SchedulerType.DIFFUSION: DiffusionScheduler,
    SchedulerType.HYBRID: HybridScheduler,
}


async def drain(scheduler: BaseScheduler) -> list[str]:
    """The prompts of every request the scheduler hands out, in order."""
    got = []
    while (r := await scheduler.get_next_request()) is not None:
        got.append(r.prompt)
    return got


def by_class() -> list[OmniRequest]:
    return [create_text_request(p, priority=p) for p in ("low", "normal", "high")]


def test_in_process_schedulers_order_by_policy() -> None:
    low = create_text_request("low", priority="low")
    high = create_text_request("high", priority="high")
    normal = create_text_request("normal", priority="normal")

    async def order(scheduler) -> list[str]:
        for r in (low, normal, high):
            await scheduler.schedule_request(r)
        got = []
        while (r := await scheduler.get_next_request()) is not None:
            got.append(r.prompt)
        return got

    assert asyncio.run(order(FIFOScheduler(SchedulerConfig()))) == ["low", "normal", "high"]
    prio = SchedulerConfig(scheduler_type=SchedulerType.PRIORITY)
    assert asyncio.run(order(PriorityScheduler(prio))) == ["high", "normal", "low"]
    hybrid = create_scheduler(SchedulerConfig(scheduler_type=SchedulerType.HYBRID))
    assert isinstance(hybrid, HybridScheduler)
    small = create_diffusion_request("small", priority="normal", **SMALL)
    large = create_diffusion_request("large", priority="normal", **LARGE)

    async def two() -> list[str]:
        await hybrid.schedule_request(large)
        await hybrid.schedule_request(small)
        return [(await hybrid.get_next_request()).prompt, (await hybrid.get_next_request()).prompt]

    assert asyncio.run(two()) == ["small", "large"]  # shortest job first within a class
    assert hybrid.get_processed_count() == 2


def test_scheduler_queue_bound_and_remove() -> None:
    scheduler = FIFOScheduler(SchedulerConfig(max_queue_size=2))
    a, b, c = (create_text_request(p) for p in "abc")

    async def run() -> None:
        assert await scheduler.schedule_request(a)
        assert not await scheduler.schedule_request(a)  # duplicate id
        assert await scheduler.schedule_request(b)
        with pytest.raises(QueueFullError):
            await scheduler.schedule_request(c)
        assert await scheduler.remove_request(a.request_id)
        assert scheduler.get_queue_size() == 1
        assert (await scheduler.get_next_request()).request_id == b.request_id

    asyncio.run(run())


@pytest.mark.parametrize("kind", list(SchedulerType))
def test_create_scheduler_returns_the_named_class(kind: SchedulerType) -> None:
    scheduler = create_scheduler(SchedulerConfig(scheduler_type=kind))
    assert type(scheduler) is NAMED[kind]
    assert scheduler.policy.scheduler_type is kind
    # The whole config works as well as its scheduler section.
    core = replace(get_config(), scheduler=SchedulerConfig(scheduler_type=kind))
    assert type(create_scheduler(core)) is NAMED[kind]


def test_create_scheduler_refuses_an_unknown_type() -> None:
    with pytest.raises(ValueError, match="Unknown scheduler type"):
        create_scheduler(SchedulerConfig(scheduler_type="random"))  # type: ignore[arg-type]


def test_a_named_scheduler_orders_by_its_own_type_whatever_the_config_says() -> None:
    says_priority = SchedulerConfig(scheduler_type=SchedulerType.PRIORITY)
    fifo = FIFOScheduler(says_priority)
    assert fifo.policy.scheduler_type is SchedulerType.FIFO

    async def fill(scheduler: PolicyScheduler) -> list[str]:
        for request in by_class():
            await scheduler.schedule_request(request)
        return await drain(scheduler)

    assert asyncio.run(fill(fifo)) == ["low", "normal", "high"]
    says_fifo = SchedulerConfig(scheduler_type=SchedulerType.FIFO)
    prio = PriorityScheduler(says_fifo)
    assert prio.policy.scheduler_type is SchedulerType.PRIORITY
    assert asyncio.run(fill(prio)) == ["high", "normal", "low"]
    # The config still sets everything else, such as the bound and the class weights.
    assert fifo.config.max_queue_size == says_priority.max_queue_size
    # The unnamed class follows the config.
    assert PolicyScheduler(says_priority).policy.scheduler_type is SchedulerType.PRIORITY
    assert PolicyScheduler(says_fifo).policy.scheduler_type is SchedulerType.FIFO


def test_adopt_takes_over_the_waiting_requests_in_the_new_order() -> None:
    old = FIFOScheduler(SchedulerConfig())
    low, normal, high = by_class()
    gone = create_text_request("gone", priority="high")
    served = create_text_request("served", priority="high")

    async def run() -> list[str]:
        for request in (served, low, gone, normal, high):
            await old.schedule_request(request)
        assert (await old.get_next_request()) is served  # handed out: not waiting any more
        assert await old.remove_request(gone.request_id)  # removed: not waiting either
        new = PriorityScheduler(SchedulerConfig(scheduler_type=SchedulerType.PRIORITY))
        new.adopt(old)
        assert new.get_queue_size() == 3
        assert not await new.schedule_request(low)  # adopted: a duplicate now
        return await drain(new)

    assert asyncio.run(run()) == ["high", "normal", "low"]


def test_adopt_keeps_arrival_order_between_equal_requests() -> None:
    old = PriorityScheduler(SchedulerConfig(scheduler_type=SchedulerType.PRIORITY))
    first, second, third = (create_text_request(p, priority="normal") for p in "abc")

    async def run() -> list[str]:
        for request in (first, second, third):
            await old.schedule_request(request)
        new = FIFOScheduler(SchedulerConfig())
        new.adopt(old)
        return await drain(new)

    assert asyncio.run(run()) == ["a", "b", "c"]


def test_get_next_request_on_empty_and_processed_count() -> None:
    scheduler = PriorityScheduler(SchedulerConfig(scheduler_type=SchedulerType.PRIORITY))

    async def run() -> None:
        assert await scheduler.get_next_request() is None
        assert not await scheduler.remove_request("nope")
        for request in by_class():
            await scheduler.schedule_request(request)
        await scheduler.remove_request(by_class()[0].request_id)  # another id: not held
        assert scheduler.get_queue_size() == 3
        await drain(scheduler)
        assert scheduler.get_processed_count() == 3
        assert scheduler.get_queue_size() == 0

    asyncio.run(run())
