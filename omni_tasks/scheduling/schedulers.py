"""In-process schedulers: requests held in memory, handed out in a policy's order.

One class, `PolicyScheduler`, serves every `SchedulerType` through `create_policy`;
the five named classes (`FIFOScheduler`, ...) are that class with the type fixed, for
code that names the policy it wants. `OmniScheduler` keeps one to answer
`get_next_request` over the requests it has scheduled.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

from omni_tasks.config import CoreModuleConfig, SchedulerConfig, SchedulerType
from omni_tasks.errors import QueueFullError
from omni_tasks.requests import OmniRequest
from omni_tasks.scheduling.policies import SchedulingPolicy, create_policy

#: What a scheduler holds and hands out: an `OmniRequest` here, a worker's step request
#: in the step loop.
ItemT = TypeVar("ItemT")


class BaseScheduler(ABC, Generic[ItemT]):
    """What every scheduler answers: schedule, hand out, remove, and two counts."""

    @abstractmethod
    async def schedule_request(self, request: ItemT) -> bool: ...

    @abstractmethod
    async def get_next_request(self) -> ItemT | None: ...

    @abstractmethod
    async def remove_request(self, request_id: str) -> bool: ...

    @abstractmethod
    def get_queue_size(self) -> int: ...

    @abstractmethod
    def get_processed_count(self) -> int: ...


class PolicyScheduler(BaseScheduler[OmniRequest]):
    """A bounded heap ordered by `policy.sort_key`; removal is lazy (O(log n) pops).

    The policy is the config's `scheduler_type`, unless the class fixes one.
    """

    scheduler_type: SchedulerType | None = None

    def __init__(self, config: SchedulerConfig | CoreModuleConfig) -> None:
        core = config if isinstance(config, CoreModuleConfig) else _with_scheduler(config)
        self.config = core.scheduler
        self.policy: SchedulingPolicy = create_policy(core, self.scheduler_type)
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
            self._push(request)
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
                self._push(request)

    def _push(self, request: OmniRequest) -> None:
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


def create_scheduler(config: SchedulerConfig | CoreModuleConfig) -> PolicyScheduler:
    """Factory: the named scheduler of the configured `scheduler_type`."""
    kind = (config.scheduler if isinstance(config, CoreModuleConfig) else config).scheduler_type
    named = {cls.scheduler_type: cls for cls in PolicyScheduler.__subclasses__()}
    try:
        return named[kind](config)
    except KeyError:
        raise ValueError(f"Unknown scheduler type: {kind}") from None


def _with_scheduler(config: SchedulerConfig) -> CoreModuleConfig:
    """The whole config of a scheduler given only its own section: the heap orders by
    that section; the rest (the pools its policy routes to) are the defaults, as a
    scheduler that sends (`OmniScheduler`) is given its whole config."""
    return CoreModuleConfig(scheduler=config)
