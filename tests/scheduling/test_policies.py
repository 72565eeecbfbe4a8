"""Scheduling policies: one per SchedulerType, request -> (pool queue, priority 0..9).

(Where `.delay()` actually puts each request, per type: tests/tasks/test_router.py.)
"""

from __future__ import annotations

from dataclasses import replace
from enum import Enum

import pytest
from helpers import LARGE, SMALL

from omni_tasks import (
    SchedulerConfig,
    SchedulerType,
    create_diffusion_request,
    create_image_request,
    create_multimodal_request,
    create_text_request,
    get_config,
)
from omni_tasks.config import ARConfig, CoreModuleConfig, DiffusionConfig
from omni_tasks.scheduling.policies import Route, SchedulingPolicy, create_policy

PNG_1PX = (  # a 1x1 PNG, base64
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmM"
    "IQAAAABJRU5ErkJggg=="
)


def config_of(kind: SchedulerType, **scheduler: object) -> CoreModuleConfig:
    return replace(get_config(), scheduler=SchedulerConfig(scheduler_type=kind, **scheduler))


def test_multimodal_dit_stage_is_routed_ahead_of_fresh_work() -> None:
    for kind in (SchedulerType.MULTIMODAL, SchedulerType.HYBRID):
        config = replace(get_config(), scheduler=SchedulerConfig(scheduler_type=kind))
        policy = create_policy(config)
        multi = create_multimodal_request("g", priority="normal", **SMALL)
        fresh = create_diffusion_request("h", priority="normal", **SMALL)
        assert policy.route(multi, "dit").level <= policy.route(fresh, "dit").level
        assert policy.route(multi, "dit").level < policy.route(multi, "ar").level or (
            kind is SchedulerType.HYBRID
        )


@pytest.mark.parametrize("kind", list(SchedulerType))
def test_create_policy_builds_the_configured_type(kind: SchedulerType) -> None:
    policy = create_policy(config_of(kind))
    assert isinstance(policy, SchedulingPolicy)
    assert policy.scheduler_type is kind
    # An explicit type wins over the config's.
    other = create_policy(config_of(SchedulerType.FIFO), kind)
    assert other.scheduler_type is kind


def test_create_policy_refuses_an_unknown_type() -> None:
    class Unknown(Enum):
        RANDOM = "random"

    with pytest.raises(ValueError, match="Unknown scheduler type"):
        create_policy(get_config(), Unknown.RANDOM)  # type: ignore[arg-type]
    broken = replace(get_config(), scheduler=SchedulerConfig(scheduler_type="random"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="random"):
        create_policy(broken)


@pytest.mark.parametrize("kind", list(SchedulerType))
def test_every_policy_routes_each_stage_to_its_pool(kind: SchedulerType) -> None:
    config = replace(
        config_of(kind), ar=ARConfig(queue="text-pool"), diffusion=DiffusionConfig(queue="dit")
    )
    policy = create_policy(config)
    requests = [
        create_text_request("a", priority="high"),
        create_text_request("b", priority="low", max_tokens=4000),
        create_diffusion_request("c", priority="normal", **LARGE),
        create_image_request("d", image=PNG_1PX, priority="low"),
        create_multimodal_request("e", priority="normal", **SMALL),
    ]
    queues = [policy.route(r).queue for r in requests]
    assert queues == ["text-pool", "text-pool", "dit", "dit", "text-pool"]  # first stage
    assert policy.route(requests[-1], "dit").queue == "dit"
    for request in requests:
        for stage in ("ar", "dit"):
            route = policy.route(request, stage)
            assert isinstance(route, Route) and 0 <= route.level <= 9
            assert policy.sort_key(request, stage) == (route.level,)


def test_fifo_uses_one_level() -> None:
    policy = create_policy(config_of(SchedulerType.FIFO))
    for priority in ("high", "normal", "low"):
        assert policy.route(create_text_request("x", priority=priority)).level == 0
        big = create_diffusion_request("x", priority=priority, **LARGE)
        assert policy.route(big).level == 0


def test_priority_spreads_the_class_weights_over_all_levels() -> None:
    policy = create_policy(config_of(SchedulerType.PRIORITY))
    levels = {
        p: policy.route(create_text_request("x", priority=p)).level
        for p in "high normal low".split()
    }
    assert levels == {"high": 0, "normal": 6, "low": 9}  # weights 2.0, 1.0, 0.5
    even = create_policy(
        config_of(SchedulerType.PRIORITY, priority_weights={"high": 3, "normal": 2, "low": 1})
    )
    assert [even.route(create_text_request("x", priority=p)).level for p in levels] == [
        0,
        4,  # round(9 * 0.5)
        9,
    ]


def test_equal_weights_put_every_class_on_the_same_level() -> None:
    weights = {"high": 1.0, "normal": 1.0, "low": 1.0}
    for kind in SchedulerType:
        policy = create_policy(config_of(kind, priority_weights=weights))
        levels = {policy.route(create_text_request("x", priority=p)).level for p in weights}
        assert len(levels) == 1, kind


def test_diffusion_and_hybrid_put_shorter_dit_work_first_within_a_class() -> None:
    tiny = create_diffusion_request("x", priority="normal", width=16, height=16, steps=1)
    small = create_diffusion_request("x", priority="normal", **SMALL)
    large = create_diffusion_request("x", priority="normal", **LARGE)
    huge = create_diffusion_request("x", priority="normal", width=2048, height=2048, steps=100)
    for kind in (SchedulerType.DIFFUSION, SchedulerType.HYBRID):
        policy = create_policy(config_of(kind))
        levels = [policy.route(r).level for r in (tiny, small, large, huge)]
        assert levels == sorted(levels) and levels[0] < levels[-1], (kind, levels)
        # The class still dominates: high work never waits behind the same size of low work.
        high = create_diffusion_request("x", priority="high", **LARGE)
        low = create_diffusion_request("x", priority="low", **LARGE)
        assert policy.route(high).level < policy.route(low).level


def test_hybrid_also_ranks_text_by_its_length_and_diffusion_does_not() -> None:
    short = create_text_request("x", priority="normal", max_tokens=16)
    long = create_text_request("x", priority="normal", max_tokens=4000)
    hybrid = create_policy(config_of(SchedulerType.HYBRID))
    assert hybrid.route(short).level < hybrid.route(long).level
    diffusion = create_policy(config_of(SchedulerType.DIFFUSION))
    assert diffusion.route(short).level == diffusion.route(long).level
