"""The worker's device memory budget (`workers.resources`): the budget and the DiT cache's
carve-out, costs measured from real tensors, the step scheduler's batches bounded by it,
refusal of a request that could never fit, and the figures in a real worker's heartbeat."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import pytest
import torch

from omni_tasks.config import CacheConfig, CoreModuleConfig
from omni_tasks.errors import ResourceError
from workers.resources import GIB, ResourceManager, ShapeProbe, device_budget
from workers.stepping import ForwardCall, StepRequest, StepScheduler, StepStatus, StepTicket

SHAPE = ("mlp", 256, 64)
ROW = 256 * 64 * 4  # one row of inputs: 256 x 64 float32
STEP_ROW = 2 * 256 * 1024 * 4  # per row, a step keeps x @ w and its relu alive at once
WEIGHT = torch.randn(64, 1024)
STATUS_KEYS = {"device", "total_bytes", "budget_bytes", "used_bytes", "cache_bytes"}
STATUS_KEYS |= {"running", "batch", "adapter_bytes"}


def probe(label: str = "256x64 image", calls: list[int] | None = None) -> ShapeProbe:
    """A step of a tiny MLP on rows of 256 x 64: its peak is exactly 2 x rows x 1 MiB."""

    def forward(inputs: dict[str, Any]) -> torch.Tensor:
        if calls is not None:
            calls.append(inputs["x"].shape[0])
        return torch.relu(inputs["x"] @ WEIGHT)

    return ShapeProbe(label, lambda rows: {"x": torch.zeros(rows, 256, 64)}, forward)


def manager(available: int, cache_gib: float = 0.001, budget_gib: float = 0.05) -> ResourceManager:
    """A CPU manager with exactly `available` bytes left for requests."""
    config = CoreModuleConfig(
        max_memory_gib=budget_gib, cache=CacheConfig(max_memory_gib=cache_gib)
    )
    budget = int(budget_gib * GIB)
    return ResourceManager(config, "cpu", resident_bytes=budget - int(cache_gib * GIB) - available)


class Req:
    def __init__(self, rid: str, shape: object = SHAPE) -> None:
        self.request_id, self.shape = rid, shape


def test_the_cpu_budget_is_max_memory_bounded_by_cpu_utilization_less_cache_and_model() -> None:
    config = CoreModuleConfig(max_memory_gib=2.0, cache=CacheConfig(max_memory_gib=0.5))
    total, budget = device_budget(config, torch.device("cpu"))
    assert total > 0 and budget == min(2 * GIB, int(0.9 * total))
    m = ResourceManager(config, "cpu", resident_bytes=1000)
    assert m.available_bytes == budget - GIB // 2 - 1000
    bounded = replace(config, max_memory_gib=10_000.0, max_cpu_utilization=0.5)
    assert ResourceManager(bounded, "cpu").budget_bytes == int(0.5 * total)


def test_the_cost_of_a_shape_is_measured_once_from_the_tensors_of_a_real_step() -> None:
    calls: list[int] = []
    m = manager(available=100 * 2**20)
    cost = m.measure(SHAPE, probe(calls=calls))
    assert (cost.row_bytes, cost.step_bytes, cost.step_row_bytes) == (ROW, STEP_ROW, STEP_ROW)
    assert cost.bytes_for(3) == 3 * ROW + 3 * STEP_ROW
    assert m.measure(SHAPE, probe(calls=calls)) == cost and calls == [1, 2]


def test_allocations_are_bounded_by_what_the_budget_leaves() -> None:
    m = manager(available=2 * (ROW + STEP_ROW) + 100)
    m.measure(SHAPE, probe())
    a, b, c = Req("a"), Req("b"), Req("c")
    assert m.allocate(a) == ROW + STEP_ROW and m.can_allocate(b)
    m.allocate(b)
    assert not m.can_allocate(c)
    with pytest.raises(ResourceError):
        m.allocate(c)
    status = m.get_resource_status()
    assert set(status) == STATUS_KEYS and status["batch"] == 2
    assert status["used_bytes"] == m.resident_bytes + 2 * (ROW + STEP_ROW)
    m.deallocate(a)
    assert m.can_allocate(c) and m.get_resource_status()["batch"] == 1


def test_an_unmeasured_shape_runs_only_alone() -> None:
    m = manager(available=10 * 2**20)
    m.measure(SHAPE, probe())
    assert m.can_allocate(Req("new", shape=("other",)))
    m.allocate(Req("a"))
    assert not m.can_allocate(Req("new", shape=("other",)))


def test_a_request_that_could_never_fit_is_refused_naming_its_size_and_the_budget() -> None:
    m = manager(available=ROW + STEP_ROW - 1)
    request = Req("big")
    with pytest.raises(ResourceError, match=r"big: a 256x64 image needs .*budget") as err:
        m.admit(request, probe())
    assert "51.2 MiB budget" in str(err.value)  # 0.05 GiB
    assert m.get_resource_status()["running"] == 0
    # Inputs alone beyond the budget: refused without running a step.
    calls: list[int] = []
    with pytest.raises(ResourceError, match="256x64"):
        manager(available=ROW - 1).admit(Req("huge"), probe(calls=calls))
    assert calls == []


def test_the_step_scheduler_stops_growing_a_batch_when_the_budget_is_exhausted() -> None:
    m = manager(available=2 * (ROW + STEP_ROW) + 100)
    m.measure(SHAPE, probe())
    s = StepScheduler(CoreModuleConfig(), resources=m)
    held = []
    for i in range(4):
        ticket = StepTicket(f"r{i}")
        r = StepRequest(ticket, steps=4, pixels=1, batch_key=SHAPE, shape=SHAPE, arrival=i)
        r.pending = ForwardCall({}, first_of_step=True)
        assert s.add(r)
        held.append(r)
    assert [r.request_id for r in s.get_next_batch(8)] == ["r0", "r1"]
    assert m.get_resource_status()["batch"] == 2
    for r in held[:2]:  # at the next step boundary they are charged again, not twice
        r.pending = ForwardCall({}, first_of_step=True)
    assert [r.request_id for r in s.get_next_batch(8)] == ["r0", "r1"]
    s.finish(held[0], StepStatus.FINISHED)
    held[1].pending = ForwardCall({}, first_of_step=True)
    assert [r.request_id for r in s.get_next_batch(8)] == ["r1", "r2"]
    assert m.get_resource_status()["batch"] == 2


def test_probes_run_where_the_device_work_runs_and_the_status_counts_what_it_is_given() -> None:
    """`run_on`, `cache_usage` and `adapter_usage` are given when the manager is built."""
    ran_on: list[str] = []

    def on_device(fn: Any) -> Any:
        ran_on.append(threading.current_thread().name)
        return fn()

    config = CoreModuleConfig(max_memory_gib=0.05, cache=CacheConfig(max_memory_gib=0.001))
    m = ResourceManager(
        config, "cpu", run_on=on_device, cache_usage=lambda: 7, adapter_usage=lambda: 5
    )
    m.measure(SHAPE, probe())
    assert ran_on == [threading.current_thread().name]  # once: the cost is kept
    status = m.get_resource_status()
    assert (status["cache_bytes"], status["adapter_bytes"], status["used_bytes"]) == (7, 5, 12)
