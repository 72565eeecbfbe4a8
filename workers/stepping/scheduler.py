"""The worker-local step scheduler: which held requests run the next denoising step.

The producer's policies order what no worker has fetched yet; this one orders what a
diffusion worker holds, every step, by the same `SchedulerType`:

- FIFO: arrival order;
- PRIORITY: class weight;
- DIFFUSION: shortest remaining cost first (steps left x pixels);
- HYBRID: remaining cost divided by class weight;
- MULTIMODAL: later stages first, then class weight.

Ties go to the earlier arrival. A held request still preparing (its prompt being
encoded) is ranked too and may reserve a slot. **Aging / starvation bound:** a request held for
`scheduler.starvation_s` or longer ranks above every request held for less, oldest
first, so from then on no later arrival passes or pauses it.

`get_next_batch(limit)` forms the next step's batch: requests in the middle of a step
(the second transformer call of true CFG) or between two calls stay in; the rest are
ranked, the best one decides the batch key, and compatible ones fill up to `limit`. With
preemption on, a running request that ranks below `limit` compatible others is PAUSED
(it resumes, exactly where it was, when it ranks high enough again); with it off, a
running request keeps its slot until it ends.

With a `ResourceManager` the batch also grows only while `can_allocate` holds: requests
at a step boundary give their charge back and are charged again if they stay in, each
request chosen is charged (`allocate`), and the first that does not fit ends the batch,
as an incompatible one does. A request paused or finished is no longer charged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from omni_tasks.config import CoreModuleConfig, SchedulerType
from omni_tasks.scheduling.schedulers import BaseScheduler
from workers.stepping.request import StepRequest, StepStatus

if TYPE_CHECKING:
    from workers.resources import ResourceManager

RankKey = tuple[float, ...]


def _rank_fn(kind: SchedulerType, weights: dict[str, float]) -> Callable[[StepRequest], RankKey]:
    """The policy's part of a rank (lower runs first); ValueError for an unknown type."""

    def weight(r: StepRequest) -> float:
        return weights.get(r.ticket.priority_class, 1.0)

    policies: dict[SchedulerType, Callable[[StepRequest], RankKey]] = {
        SchedulerType.FIFO: lambda r: (),
        SchedulerType.PRIORITY: lambda r: (-weight(r),),
        SchedulerType.DIFFUSION: lambda r: (r.remaining_cost,),
        SchedulerType.HYBRID: lambda r: (r.remaining_cost / weight(r),),
        SchedulerType.MULTIMODAL: lambda r: (0.0 if r.ticket.continuing else 1.0, -weight(r)),
    }
    try:
        return policies[kind]
    except KeyError:
        raise ValueError(f"Unknown scheduler type: {kind}") from None


class StepScheduler(BaseScheduler[StepRequest]):
    """The requests one diffusion worker holds, ranked by the configured policy.

    Not thread-safe by itself: the step loop calls it under its own lock. The async
    `BaseScheduler` methods are thin wrappers over the synchronous ones the loop uses.
    """

    def __init__(
        self,
        config: CoreModuleConfig,
        clock: Callable[[], float] = time.monotonic,
        resources: ResourceManager | None = None,
    ) -> None:
        """`resources`: the device memory budget batches must fit in (None: no bound)."""
        scheduler = config.scheduler
        self._policy = _rank_fn(scheduler.scheduler_type, scheduler.priority_weights)
        self.starvation_s = float(scheduler.starvation_s)
        self.preemption = bool(scheduler.enable_preemption)
        self._clock = clock
        self.resources = resources
        self._held: dict[str, StepRequest] = {}
        self._processed = 0

    # --- the BaseScheduler API -------------------------------------------------------------

    async def schedule_request(self, request: StepRequest) -> bool:
        return self.add(request)

    async def get_next_request(self) -> StepRequest | None:
        batch = self.get_next_batch(1)
        return batch[0] if batch else None

    async def remove_request(self, request_id: str) -> bool:
        request = self._held.get(request_id)
        if request is None:
            return False
        self.finish(request, StepStatus.FINISHED_CANCELLED)
        return True

    def get_queue_size(self) -> int:
        return len(self._held)

    def get_processed_count(self) -> int:
        return self._processed

    # --- what the loop calls ----------------------------------------------------------------

    def add(self, request: StepRequest) -> bool:
        if request.request_id in self._held:
            return False
        self._held[request.request_id] = request
        return True

    def held(self) -> list[StepRequest]:
        return list(self._held.values())

    def finish(self, request: StepRequest, status: StepStatus) -> None:
        """Take `request` out for good, with a finished `status`."""
        assert status.finished, status
        if self._held.pop(request.request_id, None) is not None:
            self._processed += 1
        self._settle_pause(request, self._clock())
        request.status = status
        request.pending = None
        if self.resources is not None:
            self.resources.deallocate(request)

    def rank(self, request: StepRequest, now: float | None = None) -> RankKey:
        """Lower runs first; starved requests (held `starvation_s`) first of all."""
        now = self._clock() if now is None else now
        if now - request.arrival >= self.starvation_s:
            return (0.0, request.arrival)
        return (1.0, *self._policy(request), request.arrival)

    def get_next_batch(self, limit: int) -> list[StepRequest]:
        """The requests whose pending calls run in the next transformer call (see the
        module docstring); updates their statuses. Empty when none can run now."""
        now = self._clock()
        running = [r for r in self._held.values() if r.status is StepStatus.RUNNING]
        at_boundary = [r for r in running if r.pending is not None and r.pending.first_of_step]
        committed = [r for r in running if r not in at_boundary]
        if not self.preemption:
            committed, at_boundary = running, []
        # Held requests still preparing (encoding their prompt) rank too: one that wins
        # a slot reserves it, so a running request it outranks pauses now, not a step
        # after it is ready.
        ready = [
            r
            for r in self._held.values()
            if r.status in (StepStatus.WAITING, StepStatus.PAUSED)
            and (r.pending is None or r.pending.first_of_step)
        ]
        ranked = sorted(at_boundary + ready, key=lambda r: self.rank(r, now))
        if self.resources is not None:
            for r in at_boundary:  # charged again below if it stays in
                self.resources.deallocate(r)
        chosen = _fill(committed, ranked, limit, self._fits)
        self._apply(chosen, running, now)
        batch = [r for r in chosen if r.pending is not None]
        for r in batch:
            r.max_batch = max(r.max_batch, len(batch))
        return batch

    def _apply(self, chosen: list[StepRequest], running: list[StepRequest], now: float) -> None:
        for r in running:
            if r not in chosen:
                r.status = StepStatus.PAUSED
                r.preemptions += 1
                r.paused_at = now
        for r in chosen:
            self._settle_pause(r, now)
            r.status = StepStatus.RUNNING
            if r.first_step_at is None:
                r.first_step_at, r.first_step_perf = time.time(), time.perf_counter()

    def _fits(self, request: StepRequest) -> bool:
        """Charge `request` to the running batch if it fits (always, with no manager)."""
        if self.resources is None:
            return True
        if not self.resources.can_allocate(request):
            return False
        self.resources.allocate(request)
        return True

    @staticmethod
    def _settle_pause(request: StepRequest, now: float) -> None:
        if request.paused_at is not None:
            request.paused_s += now - request.paused_at
            request.paused_at = None


def _fill(
    committed: list[StepRequest],
    ranked: list[StepRequest],
    limit: int,
    fits: Callable[[StepRequest], bool],
) -> list[StepRequest]:
    """`committed`, then the best `ranked` requests that may share its step and `fits`
    (which charges them), in rank order up to the first that may not: that one runs
    once the batch has drained, so nothing ranked below it overtakes it (and an
    exclusive request is never starved)."""
    chosen = list(committed)
    if any(r.exclusive for r in chosen):
        return chosen
    for r in ranked:
        if len(chosen) >= limit:
            break
        compatible = not chosen or not (r.exclusive or r.batch_key != chosen[0].batch_key)
        if not compatible or not fits(r):
            break
        chosen.append(r)
        if r.exclusive:
            break
    return chosen
