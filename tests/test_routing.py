"""Each SchedulerType puts a request on the expected queue and priority sub-list."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace

import pytest

from omni_tasks import (
    FIFOScheduler,
    HybridScheduler,
    OmniScheduler,
    PriorityScheduler,
    SchedulerConfig,
    SchedulerType,
    create_diffusion_request,
    create_multimodal_request,
    create_scheduler,
    create_text_request,
    generate_image,
    generate_multimodal,
    generate_text,
    get_config,
    set_config,
)
from omni_tasks.coordination.keys import queue_key


@pytest.fixture()
def scheduler_type(request) -> Iterator[SchedulerType]:
    original = get_config()
    kind = request.param
    set_config(replace(original, scheduler=replace(original.scheduler, scheduler_type=kind)))
    yield kind
    set_config(original)


def where(client, task_id: str) -> tuple[str, int]:
    """The (queue, priority) list in Redis that holds the message of `task_id`."""
    import json

    for queue in ("ar", "diffusion"):
        for priority in range(10):
            for raw in client.lrange(queue_key(queue, priority), 0, -1):
                if json.loads(raw)["headers"]["id"] == task_id:
                    return queue, priority
    raise AssertionError(f"{task_id} is in no queue")


SMALL = {"width": 64, "height": 64, "steps": 4}
LARGE = {"width": 512, "height": 512, "steps": 20}
# (scheduler type) -> expected (queue, priority) for: text high, text normal, text low,
# long text normal (1000 tokens), small image low, large image low, multimodal first stage.
EXPECTED = {
    SchedulerType.FIFO: [
        ("ar", 0),
        ("ar", 0),
        ("ar", 0),
        ("ar", 0),
        ("diffusion", 0),
        ("diffusion", 0),
        ("ar", 0),
    ],
    SchedulerType.PRIORITY: [
        ("ar", 0),
        ("ar", 6),
        ("ar", 9),
        ("ar", 6),
        ("diffusion", 9),
        ("diffusion", 9),
        ("ar", 6),
    ],
    SchedulerType.MULTIMODAL: [
        ("ar", 1),
        ("ar", 5),
        ("ar", 7),
        ("ar", 5),
        ("diffusion", 7),
        ("diffusion", 7),
        ("ar", 5),
    ],
    SchedulerType.DIFFUSION: [
        ("ar", 0),
        ("ar", 4),
        ("ar", 6),
        ("ar", 4),
        ("diffusion", 6),
        ("diffusion", 8),
        ("ar", 4),
    ],
    SchedulerType.HYBRID: [
        ("ar", 0),
        ("ar", 4),
        ("ar", 6),
        ("ar", 6),
        ("diffusion", 6),
        ("diffusion", 8),
        ("ar", 4),
    ],
}


@pytest.mark.parametrize("scheduler_type", list(SchedulerType), indirect=True)
def test_delay_routes_by_policy(redis_client, scheduler_type: SchedulerType) -> None:
    sent = [
        generate_text.delay(prompt="a", priority="high"),
        generate_text.delay(prompt="b", priority="normal"),
        generate_text.delay(prompt="c", priority="low"),
        generate_text.delay(prompt="d", priority="normal", max_tokens=1000),
        generate_image.delay(prompt="e", priority="low", **SMALL),
        generate_image.delay(prompt="f", priority="low", **LARGE),
        generate_multimodal.delay(prompt="g", priority="normal", **SMALL).parent,
    ]
    assert [where(redis_client, r.id) for r in sent] == EXPECTED[scheduler_type]


@pytest.mark.parametrize("scheduler_type", list(SchedulerType), indirect=True)
def test_omni_scheduler_routes_with_its_own_policy(redis_client, scheduler_type) -> None:
    # The process config says `scheduler_type`; this scheduler is configured as PRIORITY.
    scheduler = OmniScheduler(SchedulerConfig(scheduler_type=SchedulerType.PRIORITY))
    request = create_text_request("x", priority="low")
    assert asyncio.run(scheduler.schedule_request(request))
    assert where(redis_client, request.request_id) == ("ar", 9)


def test_multimodal_dit_stage_is_routed_ahead_of_fresh_work() -> None:
    from omni_tasks.scheduling.policies import create_policy

    for kind in (SchedulerType.MULTIMODAL, SchedulerType.HYBRID):
        config = replace(get_config(), scheduler=SchedulerConfig(scheduler_type=kind))
        policy = create_policy(config)
        multi = create_multimodal_request("g", priority="normal", **SMALL)
        fresh = create_diffusion_request("h", priority="normal", **SMALL)
        assert policy.route(multi, "dit").priority <= policy.route(fresh, "dit").priority
        assert policy.route(multi, "dit").priority < policy.route(multi, "ar").priority or (
            kind is SchedulerType.HYBRID
        )


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
    from omni_tasks import QueueFullError

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
