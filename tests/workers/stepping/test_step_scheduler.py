"""The worker-local step scheduler's ranking, batching, preemption and starvation bound,
on its own (the loop and the engine are tested with the real tiny Flux elsewhere)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from omni_tasks.config import CoreModuleConfig, SchedulerConfig, SchedulerType
from workers.stepping import ForwardCall, StepRequest, StepScheduler, StepStatus, StepTicket

KEY = ("flux", 128, 128, 512)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(
    kind: SchedulerType = SchedulerType.PRIORITY, clock: Clock | None = None, **fields: object
) -> StepScheduler:
    config = CoreModuleConfig(scheduler=replace(SchedulerConfig(scheduler_type=kind), **fields))
    return StepScheduler(config, clock=clock or Clock())


def held(
    scheduler: StepScheduler,
    rid: str,
    *,
    cls: str = "normal",
    steps: int = 8,
    pixels: int = 128 * 128,
    arrival: float = 100.0,
    key: object = KEY,
    continuing: bool = False,
) -> StepRequest:
    """A request held by `scheduler`, at a step boundary (its next call pending)."""
    ticket = StepTicket(rid, priority_class=cls, continuing=continuing)
    request = StepRequest(ticket, steps=steps, pixels=pixels, batch_key=key, arrival=arrival)
    assert scheduler.add(request)
    request.pending = ForwardCall({}, first_of_step=True)
    return request


def ids(batch: list[StepRequest]) -> list[str]:
    return [r.request_id for r in batch]


def test_fills_the_batch_up_to_the_limit_in_arrival_order_under_fifo() -> None:
    s = make_scheduler(SchedulerType.FIFO)
    for i in range(5):
        held(s, f"r{i}", arrival=100.0 + i)
    batch = s.get_next_batch(3)
    assert ids(batch) == ["r0", "r1", "r2"]
    assert all(r.status is StepStatus.RUNNING and r.max_batch == 3 for r in batch)
    assert s.get_queue_size() == 5


@pytest.mark.parametrize(
    ("kind", "first"),
    [
        (SchedulerType.PRIORITY, "high-long"),  # class weight only
        (SchedulerType.DIFFUSION, "low-short"),  # shortest remaining cost only
        # remaining cost / weight: 40 steps at weight 2 (0.33 MP-steps) against 4 steps
        # at weight 0.5 (0.13): the short low-class request goes first.
        (SchedulerType.HYBRID, "low-short"),
        (SchedulerType.MULTIMODAL, "low-continuing"),  # later stages first
    ],
)
def test_each_policy_picks_its_first(kind: SchedulerType, first: str) -> None:
    s = make_scheduler(kind)
    held(s, "high-long", cls="high", steps=40, arrival=101.0)
    held(s, "low-short", cls="low", steps=4, arrival=102.0)
    held(s, "low-continuing", cls="low", steps=40, arrival=103.0, continuing=True)
    assert ids(s.get_next_batch(1)) == [first]


def test_remaining_cost_shrinks_as_steps_run() -> None:
    s = make_scheduler(SchedulerType.DIFFUSION)
    a = held(s, "a", steps=10, arrival=100.0)
    held(s, "b", steps=6, arrival=101.0)
    assert ids(s.get_next_batch(1)) == ["b"]
    a.steps_done = 5  # a has 5 left, b still 6 (it has not run a step yet)
    a.pending = ForwardCall({}, first_of_step=True)
    assert ids(s.get_next_batch(1)) == ["a"]


def test_a_higher_class_arrival_pauses_the_lowest_running_request() -> None:
    clock = Clock()
    s = make_scheduler(clock=clock)
    lows = [held(s, f"low{i}", cls="low", arrival=100.0 + i) for i in range(2)]
    assert ids(s.get_next_batch(2)) == ["low0", "low1"]
    clock.now = 105.0
    for r in lows:  # both finished their step and wait for the next one
        r.pending = ForwardCall({}, first_of_step=True)
    high = held(s, "high", cls="high", arrival=104.0)
    batch = s.get_next_batch(2)
    assert set(ids(batch)) == {"high", "low0"}
    assert lows[1].status is StepStatus.PAUSED and lows[1].preemptions == 1
    assert high.status is StepStatus.RUNNING and high.preemptions == 0
    clock.now = 107.5  # high finishes; low1 resumes and has been paused 2.5 s
    s.finish(high, StepStatus.FINISHED)
    lows[0].pending = ForwardCall({}, first_of_step=True)
    assert set(ids(s.get_next_batch(2))) == {"low0", "low1"}
    assert lows[1].paused_s == pytest.approx(2.5)
    assert s.get_processed_count() == 1


def test_without_preemption_a_running_request_keeps_its_slot() -> None:
    s = make_scheduler(enable_preemption=False)
    low = held(s, "low", cls="low")
    assert ids(s.get_next_batch(1)) == ["low"]
    low.pending = ForwardCall({}, first_of_step=True)
    held(s, "high", cls="high", arrival=101.0)
    assert ids(s.get_next_batch(1)) == ["low"]
    assert low.preemptions == 0


def test_a_request_in_the_middle_of_a_step_is_never_paused() -> None:
    s = make_scheduler()
    low = held(s, "low", cls="low")
    assert ids(s.get_next_batch(1)) == ["low"]
    low.pending = ForwardCall({}, first_of_step=False)  # true CFG's second call
    held(s, "high", cls="high", arrival=101.0)
    assert ids(s.get_next_batch(1)) == ["low"]
    low.pending = ForwardCall({}, first_of_step=True)
    assert ids(s.get_next_batch(1)) == ["high"]


def test_only_requests_with_the_same_key_share_a_step() -> None:
    s = make_scheduler(SchedulerType.FIFO)
    held(s, "a", arrival=100.0)
    held(s, "big", key=("flux", 256, 256, 512), arrival=101.0)
    held(s, "c", arrival=102.0)
    # "big" may not join a's step, and nothing ranked below it overtakes it.
    assert ids(s.get_next_batch(8)) == ["a"]


def test_an_exclusive_request_runs_alone() -> None:
    s = make_scheduler(SchedulerType.FIFO)
    held(s, "cached", key=None, arrival=100.0)
    held(s, "plain", arrival=101.0)
    assert ids(s.get_next_batch(8)) == ["cached"]


def test_starvation_bound_a_request_held_that_long_ranks_above_later_arrivals() -> None:
    clock = Clock()
    s = make_scheduler(clock=clock, starvation_s=5.0)
    low = held(s, "low", cls="low", arrival=100.0)
    assert ids(s.get_next_batch(1)) == ["low"]
    low.pending = ForwardCall({}, first_of_step=True)
    clock.now = 101.0
    held(s, "high1", cls="high", arrival=101.0)
    assert ids(s.get_next_batch(1)) == ["high1"]  # paused: it ranks below high1
    clock.now = 105.0  # held 5 s: from now on it ranks first
    held(s, "high2", cls="high", arrival=105.0)
    assert ids(s.get_next_batch(1)) == ["low"]
    assert s.rank(low) < s.rank(s.held()[-1])


def test_the_seed_api_over_the_same_requests() -> None:
    s = make_scheduler(SchedulerType.FIFO)
    request = StepRequest(StepTicket("x"), steps=4, pixels=64 * 64, batch_key=KEY)
    assert asyncio.run(s.schedule_request(request))
    assert not asyncio.run(s.schedule_request(request))  # already held
    request.pending = ForwardCall({}, first_of_step=True)
    assert asyncio.run(s.get_next_request()) is request
    assert asyncio.run(s.remove_request("x"))
    assert request.status is StepStatus.FINISHED_CANCELLED
    assert not asyncio.run(s.remove_request("x"))
    assert (s.get_queue_size(), s.get_processed_count()) == (0, 1)


def test_an_unknown_policy_is_a_value_error() -> None:
    config = CoreModuleConfig()
    config.scheduler.scheduler_type = "lottery"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="Unknown scheduler type"):
        StepScheduler(config)


def test_a_preparing_request_that_outranks_reserves_a_slot_at_once() -> None:
    s = make_scheduler()
    low = held(s, "low", cls="low")
    assert ids(s.get_next_batch(1)) == ["low"]
    low.pending = ForwardCall({}, first_of_step=True)
    high = held(s, "high", cls="high", arrival=101.0)
    high.pending = None  # still encoding its prompt
    assert s.get_next_batch(1) == []  # nothing runs: the slot waits for high
    assert low.status is StepStatus.PAUSED and high.status is StepStatus.RUNNING
    high.pending = ForwardCall({}, first_of_step=True)
    assert ids(s.get_next_batch(1)) == ["high"]
