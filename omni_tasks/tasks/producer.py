"""Producer-side operations on a request: submit it, cancel it."""

from __future__ import annotations

from typing import Any

from celery.result import AsyncResult

from omni_tasks.requests import OmniRequest, RequestType
from omni_tasks.scheduling.policies import SchedulingPolicy, first_stage
from omni_tasks.tasks.celery_app import app
from omni_tasks.tasks.context import producer_context
from omni_tasks.tasks.definitions import TASK_FOR_TYPE, multimodal_chain, task_ids_of
from omni_tasks.tasks.router import resolve_route

REVOKE_TTL_S = 7 * 86400


def submit(
    request: OmniRequest, policy: SchedulingPolicy | None = None, **options: Any
) -> AsyncResult:
    """Enqueue a validated request on its pool at its level; returns its result.

    The route comes from `policy` when given (an `OmniScheduler`'s own), else from the
    configured policy through the Celery router. The result's id is the request id (for
    MULTIMODAL: the id of the chain's last task).
    """
    if request.request_type is RequestType.MULTIMODAL:
        return multimodal_chain(request, policy).apply_async(**options)
    task = TASK_FOR_TYPE[request.request_type]
    if policy is not None:
        route = resolve_route(request, first_stage(request), policy, task.omni_context.redis)
        options = {"queue": route.queue, "priority": route.level, **options}
    return task.apply_async(kwargs=request.to_message(), **options)


def cancel(request_id: str, request_type: RequestType | None = None) -> None:
    """Revoke a request: running workers drop it, and a flag in Redis makes workers
    started later skip it too (Celery's revoke list lives only in live workers)."""
    ids = task_ids_of(request_id, request_type)
    context = producer_context(app)
    pipe = context.redis.pipeline(transaction=True)
    for task_id in ids:
        pipe.set(context.keys.revoked(task_id), 1, ex=REVOKE_TTL_S)
    pipe.execute()
    app.control.revoke(ids)
