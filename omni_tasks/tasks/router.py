"""The Celery router: every omni-tasks message gets its queue and level here.

Plain `.delay()`, `apply_async`, chains and `send_task` by name all pass through
Celery's router, so routing needs nothing special from apps. The policy is the one of
the current config (`create_policy`), so `OmniScheduler.update_config` takes effect on
the next message.
"""

from __future__ import annotations

import logging
from typing import Any

from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination import cache_directory, keys
from omni_tasks.coordination.client import OmniRedis
from omni_tasks.model_registry import dit_model
from omni_tasks.requests import OmniRequest, Stage
from omni_tasks.scheduling.policies import Route, SchedulingPolicy, create_policy
from omni_tasks.tasks.base import OmniTask
from omni_tasks.tasks.celery_app import app, routed_queue
from omni_tasks.tasks.sending import request_being_sent

log = logging.getLogger(__name__)


class OmniRouter:
    """Routes omni-tasks tasks by request; leaves other tasks to Celery's defaults.

    Keeps the policy of the sending app's config, rebuilt only when that config object
    changes.
    """

    def __init__(self) -> None:
        self._policy: tuple[CoreModuleConfig, SchedulingPolicy] | None = None

    def current_policy(self, config: CoreModuleConfig) -> SchedulingPolicy:
        """The policy of `config` (the sending task's app's)."""
        if self._policy is None or self._policy[0] is not config:
            self._policy = (config, create_policy(config))
        return self._policy[1]

    def __call__(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: dict[str, Any],
        task: Any = None,
        **_: Any,
    ) -> dict[str, Any] | None:
        if not isinstance(task, OmniTask):
            task = app.tasks.get(name)
            if not isinstance(task, OmniTask):
                return None
        # The request a send validated the message into, else validate it now
        # (RequestValidationError: nothing sent).
        request = request_being_sent(kwargs) or task.build_request(kwargs or {})
        context = task.omni_context
        policy = self.current_policy(context.config)
        route = resolve_route(request, task.stage, policy, context.redis)
        return {"queue": route.queue, "priority": route.level}


#: The app's router: the Celery config names it (`celery_app.ROUTER`).
app_router = OmniRouter()


def resolve_route(
    request: OmniRequest, stage: Stage, policy: SchedulingPolicy, client: OmniRedis
) -> Route:
    """The policy's route; a DiT stage goes to its model's queue (`keys.model_queue`),
    which only the workers serving that model read. A DiT request whose cache keys or
    LoRA adapters a live, not overloaded worker holds goes to that worker's own queue
    instead, with the same level (`cache_directory.affinity_keys`: the keys name the
    model, so the holder serves it; a MULTIMODAL DiT stage's prompt is written by its
    AR stage, so only its adapters are known when it is routed). `client` is the
    coordination Redis of the sender's context, where the cache directory and the
    workers' heartbeats are.
    """
    route = policy.route(request, stage)
    config = policy.config
    if stage != "dit":
        return route
    queue = keys.model_queue(route.queue, dit_model(request, config))
    route = Route(queue=routed_queue(queue), level=route.level)
    # A worker's own queue is a Redis list that live workers drain when it dies; a
    # RabbitMQ broker would keep a dead worker's queue full.
    if not config.diffusion.cache_affinity or not config.broker_is_redis:
        return route
    try:
        wanted = cache_directory.affinity_keys(request, config)
        holder = cache_directory.pick_holder(client, wanted) if wanted else None
    except Exception:  # the directory is an optimisation: route normally without it
        log.warning("cache directory lookup failed", exc_info=True)
        return route
    if holder is None:
        return route
    own = client.keyspace.worker_queue(holder)
    return Route(queue=routed_queue(own), level=route.level)
