"""The metrics of `omni_tasks.metrics` without a pool: a Redis that does not answer reads
as down, and a real step loop records batches and preemptions."""

from __future__ import annotations

from helpers import eventually
from prometheus_client.parser import text_string_to_metric_families

#: Sample name -> {frozenset of (label, value)} -> value.
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get(name, {}).get(frozenset(labels.items()), 0.0)


def test_a_redis_that_does_not_answer_reads_as_down(use_config) -> None:
    from dataclasses import replace

    from omni_tasks.config import get_config
    from omni_tasks.metrics import ClusterCollector

    use_config(replace(get_config(), redis_url="redis://127.0.0.1:1/11"))  # nothing listens
    families = list(ClusterCollector().collect())
    assert [(f.name, [s.value for s in f.samples]) for f in families] == [("omni_redis_up", [0])]


def test_the_step_loop_records_batches_and_preemptions() -> None:
    """A real step loop with a batch limit of 1: a high-priority request arriving while a
    low-priority one runs pauses it at the next step boundary."""
    import threading

    from prometheus_client import generate_latest

    from omni_tasks.config import CoreModuleConfig, SchedulerConfig, SchedulerType
    from omni_tasks.metrics import registry
    from workers.runtime import PoolStepCounters, runtime
    from workers.stepping import StepLoop, StepRequest, StepScheduler, StepTicket

    def served() -> Samples:
        samples: Samples = {}
        for family in text_string_to_metric_families(generate_latest(registry()).decode()):
            for s in family.samples:
                samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
        return samples

    before = served()
    gate = threading.Event()

    def run_batch(calls: list) -> None:
        gate.wait(10)  # holds the first step until the high-priority request waits
        for call in calls:
            call.resolve(None)

    config = CoreModuleConfig(scheduler=SchedulerConfig(scheduler_type=SchedulerType.PRIORITY))
    counters = PoolStepCounters(runtime.counters, config.diffusion.queue)
    loop = StepLoop(StepScheduler(config), run_batch, limit=1, counters=counters)
    low = StepRequest(StepTicket("low", priority_class="low"), steps=3, pixels=1, batch_key="k")
    high = StepRequest(StepTicket("high", priority_class="high"), steps=2, pixels=1, batch_key="k")

    def steps(request: StepRequest) -> None:
        with loop.holding(request):
            for _ in range(request.steps):
                loop.forward(request, None, first_of_step=True)

    threads = [threading.Thread(target=steps, args=(r,)) for r in (low, high)]
    threads[0].start()
    assert eventually(lambda: low.first_step_at is not None, timeout_s=5)
    threads[1].start()
    assert eventually(lambda: high.pending is not None, timeout_s=5)
    gate.set()
    for thread in threads:
        thread.join(10)
    loop.stop()
    assert (low.preemptions, high.preemptions) == (1, 0)
    runtime.counters.flush()
    after = served()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("omni_preemptions_total", pool="diffusion") == 1
    assert delta("omni_step_batch_size_count", pool="diffusion") == 5  # one step per batch
    assert delta("omni_step_batch_size_bucket", pool="diffusion", le="1.0") == 5
