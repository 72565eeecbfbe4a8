"""Scheduling policies: request -> (pool queue, level 0..9, 0 highest: Celery's `priority`).

The one registry of `SchedulerType`s: a policy per type, built by `create_policy`
(`ValueError` for an unknown type). The producer uses it to pick the queue and the
level's sub-list in Redis; the in-process schedulers order what they hold by the same
`sort_key`, so a request is ranked the same way everywhere.

- FIFO: one level; arrival order only.
- PRIORITY: class weights spread over all ten levels (heaviest class -> 0).
- MULTIMODAL: class band, and a request's later stage (the DiT stage of a MULTIMODAL
  chain) ranks above fresh work of its class, so started requests finish first.
- DIFFUSION: class band, then shortest-job-first on DiT cost (steps x pixels).
- HYBRID: class band, then shortest-job-first on the cost of each kind of work
  (max_tokens for AR, steps x pixels for DiT, characters for speech), later stages first.
"""

from __future__ import annotations

from dataclasses import dataclass

from omni_tasks.config import CoreModuleConfig, SchedulerType
from omni_tasks.coordination.keys import PRIORITY_STEPS
from omni_tasks.requests import OmniRequest, Stage, stages_of

MAX_LEVEL = PRIORITY_STEPS[-1]  # 0 is served first
BAND_SPAN = 6  # class bands start at 0..6, leaving 0..3 for the in-class offset
# Cost-bucket edges: megapixel-steps for DiT work, kilo-tokens for AR work.
DIT_COST_EDGES = (0.1, 1.0, 10.0)
AR_COST_EDGES = (0.128, 0.512, 2.048)
#: Kilo-characters of speech: a sentence, a paragraph, a page.
TTS_COST_EDGES = (0.2, 1.0, 4.0)


@dataclass(frozen=True)
class Route:
    """Where a message goes: a queue, and a level (0 highest; Celery's `priority`)."""

    queue: str
    level: int


def first_stage(request: OmniRequest) -> Stage:
    return stages_of(request.request_type)[0]


class SchedulingPolicy:
    """Base policy: pool by stage; subclasses decide the level."""

    scheduler_type: SchedulerType

    def __init__(self, config: CoreModuleConfig) -> None:
        self.config = config
        weights = config.scheduler.priority_weights
        self._wmax, self._wmin = max(weights.values()), min(weights.values())
        self._weights = weights

    def route(self, request: OmniRequest, stage: Stage | None = None) -> Route:
        stage = stage or first_stage(request)
        queue = self.config.pool_for(stage).queue
        return Route(queue=queue, level=self.level(request, stage))

    def level(self, request: OmniRequest, stage: Stage) -> int:
        raise NotImplementedError

    def sort_key(self, request: OmniRequest, stage: Stage | None = None) -> tuple[float, ...]:
        """Order within one scheduler (ties go to the earlier arrival, as in Redis)."""
        stage = stage or first_stage(request)
        return (self.level(request, stage),)

    # Helpers shared by the policies.
    def class_position(self, request: OmniRequest) -> float:
        """0.0 for the heaviest class, 1.0 for the lightest."""
        if self._wmax == self._wmin:
            return 0.0
        return (self._wmax - self._weights[request.priority]) / (self._wmax - self._wmin)

    def class_band(self, request: OmniRequest) -> int:
        return round(BAND_SPAN * self.class_position(request))


class FIFOPolicy(SchedulingPolicy):
    scheduler_type = SchedulerType.FIFO

    def level(self, request: OmniRequest, stage: Stage) -> int:
        return 0


class PriorityPolicy(SchedulingPolicy):
    scheduler_type = SchedulerType.PRIORITY

    def level(self, request: OmniRequest, stage: Stage) -> int:
        return round(MAX_LEVEL * self.class_position(request))


class MultimodalPolicy(SchedulingPolicy):
    scheduler_type = SchedulerType.MULTIMODAL

    def level(self, request: OmniRequest, stage: Stage) -> int:
        continuing = stage != first_stage(request)
        return self.class_band(request) + (0 if continuing else 1)


class DiffusionPolicy(SchedulingPolicy):
    scheduler_type = SchedulerType.DIFFUSION

    def level(self, request: OmniRequest, stage: Stage) -> int:
        if stage != "dit":
            return self.class_band(request)
        return self.class_band(request) + cost_bucket(request.dit_cost(), DIT_COST_EDGES)


class HybridPolicy(SchedulingPolicy):
    scheduler_type = SchedulerType.HYBRID

    def level(self, request: OmniRequest, stage: Stage) -> int:
        if stage == "dit":
            offset = cost_bucket(request.dit_cost(), DIT_COST_EDGES)
        elif stage == "tts":
            offset = cost_bucket(request.tts_cost(), TTS_COST_EDGES)
        else:
            offset = cost_bucket(request.ar_cost(), AR_COST_EDGES)
        if stage != first_stage(request):
            offset = max(0, offset - 1)
        return self.class_band(request) + offset


def cost_bucket(cost: float, edges: tuple[float, ...]) -> int:
    return sum(cost >= edge for edge in edges)


_POLICIES: dict[SchedulerType, type[SchedulingPolicy]] = {
    cls.scheduler_type: cls
    for cls in (FIFOPolicy, PriorityPolicy, MultimodalPolicy, DiffusionPolicy, HybridPolicy)
}


def create_policy(
    config: CoreModuleConfig, scheduler_type: SchedulerType | None = None
) -> SchedulingPolicy:
    """Factory: the policy of `scheduler_type` (default: the config's)."""
    kind = scheduler_type or config.scheduler.scheduler_type
    try:
        return _POLICIES[kind](config)
    except KeyError:
        raise ValueError(f"Unknown scheduler type: {kind}") from None
