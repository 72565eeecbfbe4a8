"""Scheduling: the policies of the five `SchedulerType`s (queue + level per request),
the in-process schedulers ordered by them, and `OmniScheduler`, the async scheduler API
over the shared queues."""

from omni_tasks.scheduling.omni_scheduler import CoreScheduler, OmniScheduler
from omni_tasks.scheduling.policies import Route, SchedulingPolicy, create_policy
from omni_tasks.scheduling.schedulers import (
    BaseScheduler,
    DiffusionScheduler,
    FIFOScheduler,
    HybridScheduler,
    MultimodalScheduler,
    PolicyScheduler,
    PriorityScheduler,
    create_scheduler,
)

__all__ = [
    "BaseScheduler",
    "CoreScheduler",
    "DiffusionScheduler",
    "FIFOScheduler",
    "HybridScheduler",
    "MultimodalScheduler",
    "OmniScheduler",
    "PolicyScheduler",
    "PriorityScheduler",
    "Route",
    "SchedulingPolicy",
    "create_policy",
    "create_scheduler",
]
