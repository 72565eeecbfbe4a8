"""Producer-side helpers: submit a request, cancel it, read queue depths from Redis."""

from __future__ import annotations

from typing import Any

from celery.result import AsyncResult

from omni_tasks import keys
from omni_tasks.config import get_config
from omni_tasks.policies import SchedulingPolicy, stages_of
from omni_tasks.redis_client import get_redis
from omni_tasks.requests import OmniRequest, RequestType
from omni_tasks.routing import resolve_route

REVOKE_TTL_S = 7 * 86400


def submit(
    request: OmniRequest, policy: SchedulingPolicy | None = None, **options: Any
) -> AsyncResult:
    """Enqueue a validated request on its pool with its priority; returns its result.

    The route comes from `policy` when given (an `OmniScheduler`'s own), else from the
    configured policy through the Celery router. The result's id is the request id (for
    MULTIMODAL: the id of the chain's last task).
    """
    from omni_tasks.tasks import TASK_FOR_TYPE, multimodal_chain

    if request.request_type is RequestType.MULTIMODAL:
        return multimodal_chain(request, policy).apply_async(**options)
    if policy is not None:
        route = resolve_route(request, stages_of(request)[0], policy)
        options = {"queue": route.queue, "priority": route.priority, **options}
    task = TASK_FOR_TYPE[request.request_type]
    return task.apply_async(kwargs=request.to_message(), **options)


def task_ids_of(request_id: str, request_type: RequestType | None = None) -> list[str]:
    """The Celery task ids a request runs as (a MULTIMODAL request has two stages)."""
    if request_type in (None, RequestType.MULTIMODAL):
        return [f"{request_id}.prompt", request_id]
    return [request_id]


def cancel(request_id: str, request_type: RequestType | None = None) -> None:
    """Revoke a request: running workers drop it, and a flag in Redis makes workers
    started later skip it too (Celery's revoke list lives only in live workers)."""
    from omni_tasks.celery_app import app

    ids = task_ids_of(request_id, request_type)
    client = get_redis()
    pipe = client.pipeline(transaction=True)
    for task_id in ids:
        pipe.set(keys.revoked(task_id), 1, ex=REVOKE_TTL_S)
    pipe.execute()
    app.control.revoke(ids)


def queue_depths() -> dict[str, dict[int, int]]:
    """Messages waiting per pool and priority level (0 highest). The diffusion pool's
    figure includes its workers' own queues (cache-affinity routing puts work there)."""
    config = get_config()
    client = get_redis()
    depths: dict[str, dict[int, int]] = {}
    for queue in (config.ar.queue, config.diffusion.queue):
        pipe = client.pipeline(transaction=False)
        for key in keys.queue_keys(queue):
            pipe.llen(key)
        depths[queue] = dict(enumerate(pipe.execute()))
    own = depths[config.diffusion.queue]
    prefix = keys.worker_queue("")
    for key in client.scan_iter(match=prefix + "*", count=500):
        _, sep, level = key[len(prefix) :].rpartition(keys.PRIORITY_SEP)
        priority = int(level) if sep and level.isdigit() else 0
        own[priority] += int(client.llen(key))
    return depths


def total_queued() -> int:
    return sum(sum(levels.values()) for levels in queue_depths().values())
