"""The seed's in-process schedulers: one per `SchedulerType`, ordered by its policy.

They hold requests in memory and hand them out in the policy's order. `OmniScheduler`
keeps one to answer `get_next_request` over the requests it has scheduled; workers use
the same classes to order what they hold.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from abc import ABC, abstractmethod

from omni_tasks.config import CoreModuleConfig, SchedulerConfig, SchedulerType, get_config
from omni_tasks.errors import QueueFullError
from omni_tasks.policies import SchedulingPolicy, create_policy
from omni_tasks.requests import OmniRequest


class BaseScheduler(ABC):
    """Abstract base class for all schedulers (the seed's interface)."""

    @abstractmethod
    async def schedule_request(self, request: OmniRequest) -> bool: ...

    @abstractmethod
    async def get_next_request(self) -> OmniRequest | None: ...

    @abstractmethod
    async def remove_request(self, request_id: str) -> bool: ...

    @abstractmethod
    def get_queue_size(self) -> int: ...

    @abstractmethod
    def get_processed_count(self) -> int: ...


class PolicyScheduler(BaseScheduler):
    """A bounded heap ordered by `policy.sort_key`; removal is lazy (O(log n) pops)."""

    scheduler_type: SchedulerType

    def __init__(self, config: SchedulerConfig | CoreModuleConfig) -> None:
        core = config if isinstance(config, CoreModuleConfig) else _with_scheduler(config)
        self.config = core.scheduler
        self.policy: SchedulingPolicy = create_policy(core)
        self._heap: list[tuple[tuple[float, ...], int, str]] = []
        self._requests: dict[str, OmniRequest] = {}
        self._seq = itertools.count()
        self._processed = 0
        self._lock = threading.Lock()

    async def schedule_request(self, request: OmniRequest) -> bool:
        with self._lock:
            if request.request_id in self._requests:
                return False
            if len(self._requests) >= self.config.max_queue_size:
                raise QueueFullError(
                    f"scheduler holds {len(self._requests)} requests "
                    f"(max_queue_size={self.config.max_queue_size})"
                )
            self._requests[request.request_id] = request
            key = self.policy.sort_key(request)
            heapq.heappush(self._heap, (key, next(self._seq), request.request_id))
            return True

    async def get_next_request(self) -> OmniRequest | None:
        with self._lock:
            while self._heap:
                _, _, request_id = heapq.heappop(self._heap)
                request = self._requests.pop(request_id, None)
                if request is not None:
                    self._processed += 1
                    return request
            return None

    async def remove_request(self, request_id: str) -> bool:
        with self._lock:
            return self._requests.pop(request_id, None) is not None

    def adopt(self, other: PolicyScheduler) -> None:
        """Take over `other`'s waiting requests, ordered by this scheduler's policy."""
        with other._lock:
            waiting = [
                other._requests[rid] for _, _, rid in sorted(other._heap) if rid in other._requests
            ]
        with self._lock:
            for request in waiting:
                self._requests[request.request_id] = request
                key = self.policy.sort_key(request)
                heapq.heappush(self._heap, (key, next(self._seq), request.request_id))

    def get_queue_size(self) -> int:
        return len(self._requests)

    def get_processed_count(self) -> int:
        return self._processed


class FIFOScheduler(PolicyScheduler):
    scheduler_type = SchedulerType.FIFO


class PriorityScheduler(PolicyScheduler):
    scheduler_type = SchedulerType.PRIORITY


class MultimodalScheduler(PolicyScheduler):
    scheduler_type = SchedulerType.MULTIMODAL


class DiffusionScheduler(PolicyScheduler):
    scheduler_type = SchedulerType.DIFFUSION


class HybridScheduler(PolicyScheduler):
    scheduler_type = SchedulerType.HYBRID


_SCHEDULERS: dict[SchedulerType, type[PolicyScheduler]] = {
    cls.scheduler_type: cls
    for cls in (
        FIFOScheduler,
        PriorityScheduler,
        MultimodalScheduler,
        DiffusionScheduler,
        HybridScheduler,
    )
}


def create_scheduler(config: SchedulerConfig | CoreModuleConfig) -> PolicyScheduler:
    """Factory: the scheduler class of the configured `scheduler_type`."""
    sched = config.scheduler if isinstance(config, CoreModuleConfig) else config
    try:
        return _SCHEDULERS[sched.scheduler_type](config)
    except KeyError:
        raise ValueError(f"Unknown scheduler type: {sched.scheduler_type}") from None


def _with_scheduler(config: SchedulerConfig) -> CoreModuleConfig:
    base = get_config()
    return CoreModuleConfig(**{**base.__dict__, "scheduler": config})
