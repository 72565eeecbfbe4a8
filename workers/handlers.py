"""What a task body runs on a worker: the handler registered for each task name.

Every handler trusts nothing. For a message that came back it checks cancellation and
caps redeliveries (a message that keeps killing workers); it validates the message
again, rejecting and recording what does not parse; it runs the stage on this worker's
engines; it hands the message back if the engine is shutting down; and it counts the
outcome for monitoring.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis
from celery import Celery, states
from celery.exceptions import Ignore, Reject

from omni_tasks.config import get_config
from omni_tasks.coordination import keys
from omni_tasks.coordination.client import get_redis, get_scripts
from omni_tasks.coordination.counters import count_outcome
from omni_tasks.coordination.ledger import REPUBLISHED_HEADER
from omni_tasks.coordination.rejections import record_rejection
from omni_tasks.errors import (
    EngineStoppedError,
    ProcessingError,
    RequestCancelledError,
    RequestTimeoutError,
    RequestValidationError,
    RequestYieldedError,
)
from omni_tasks.requests import OmniRequest
from omni_tasks.results import ProbeResult
from omni_tasks.tasks.base import OmniTask, TaskHandler
from omni_tasks.tasks.celery_app import delivered_level
from workers import execution, progress, task_context
from workers.runtime import runtime

DELIVERY_KEY_TTL_S = 7 * 86400
#: What gives a running request's message back to the queue rather than failing it.
HANDED_BACK = (EngineStoppedError, RequestYieldedError, redis.ConnectionError, redis.TimeoutError)
#: Runs a task's stage: the validated request and the previous stage's result -> a
#: typed result (`omni_tasks.results`).
Runner = Callable[[OmniRequest, "dict[str, Any] | None"], Any]


def handler_for(runner: Runner) -> TaskHandler:
    def handle(task: OmniTask, kwargs: dict[str, Any], previous: dict[str, Any] | None) -> Any:
        return execute(task, kwargs, lambda request: runner(request, previous))

    return handle


def execute(
    task: OmniTask, kwargs: dict[str, Any], run: Callable[[OmniRequest], Any]
) -> dict[str, Any]:
    """Run one message of `task` (see the module docstring); returns the result's JSON."""
    started = time.time()
    task_id = task.request.id or ""
    queue = task.stage_queue
    client = get_redis()
    redelivered = bool((task.request.delivery_info or {}).get("redelivered")) or bool(
        getattr(task.request, REPUBLISHED_HEADER, False)
    )
    if redelivered:
        _admit_redelivery(task, task_id, kwargs, queue)
    try:
        request = task.build_request(kwargs)
    except RequestValidationError as exc:
        _record_failure(task, task_id, queue, str(exc), kwargs)
        raise
    try:
        priority = delivered_level(
            (task.request.delivery_info or {}).get("priority"), get_config().broker_is_redis
        )
        with task_context.running(task_id, priority), progress.reporting(task):
            result = run(request)
    except HANDED_BACK as exc:
        # A warm shutdown, an unstarted request handed back for higher-priority work, or
        # Redis gone mid-run (a restart): not the request's fault, so give the message
        # back; the credit cancels the count the redelivered message will add when it
        # starts again.
        with contextlib.suppress(redis.RedisError):
            client.decr(keys.deliveries(task_id))
        raise Reject(str(exc), requeue=True) from None
    except RequestTimeoutError:
        count_outcome(queue, "expired")
        raise
    except RequestCancelledError:
        task.backend.mark_as_revoked(task_id, "cancelled while running", request=task.request)
        count_outcome(queue, "cancelled")
        raise Ignore() from None
    except Exception:
        count_outcome(queue, "failed")
        raise
    run_s = time.time() - started
    timings = result.timings
    timings.setdefault("queued_s", round(max(0.0, started - request.created_at), 6))
    timings.setdefault("run_s", round(run_s, 6))
    timings.setdefault("started_at", round(started, 6))
    runtime.counters.add_success(queue, run_s, timings["queued_s"], request.request_type.value)
    if redelivered:
        client.delete(keys.deliveries(task_id))
    return result.to_json()


def _admit_redelivery(task: OmniTask, task_id: str, kwargs: Any, queue: str) -> None:
    """A message that came back (worker died, shutdown, visibility timeout, the reaper):
    skip it if its request is already done (a duplicate: the first result stands) or was
    cancelled meanwhile; refuse it after `max_redeliveries` returns.

    First deliveries skip these round trips: Celery's revoked list covers them (and
    workers load the Redis revocations when they start).
    """
    if task.backend.get_task_meta(task_id).get("status") == states.SUCCESS:
        count_outcome(queue, "duplicates")
        raise Ignore()
    revoked, returns = get_scripts().admit_redelivery(
        keys=[keys.revoked(task_id), keys.deliveries(task_id)], args=[DELIVERY_KEY_TTL_S]
    )
    if revoked:
        task.backend.mark_as_revoked(task_id, "cancelled before it ran", request=task.request)
        count_outcome(queue, "cancelled")
        raise Ignore()
    cap = get_config().max_redeliveries
    if int(returns) > cap:
        reason = f"redelivered {returns} times (max_redeliveries={cap}); giving up"
        _record_failure(task, task_id, queue, reason, kwargs)
        raise ProcessingError(reason)


def _record_failure(task: OmniTask, task_id: str, queue: str, reason: str, body: Any) -> None:
    """A message refused without running: kept in the rejected list, counted as failed."""
    record_rejection(reason, task_id=task_id, task_name=task.name, queue=queue, body=body)
    count_outcome(queue, "failed")


def _probe(request: OmniRequest, previous: dict[str, Any] | None) -> ProbeResult:
    return ProbeResult(request_id=request.request_id)


#: Task name -> what its body runs.
RUNNERS: Mapping[str, Runner] = {
    "omni_tasks.generate_text": lambda request, _: execution.run_text(request),
    "omni_tasks.generate_image": lambda request, _: execution.run_image(request),
    "omni_tasks.multimodal_prompt": lambda request, _: execution.run_multimodal_prompt(request),
    "omni_tasks.multimodal_render": execution.run_multimodal_render,
    "omni_tasks.probe": _probe,
}


def register_handlers(app: Celery) -> None:
    """Give each task of `app` the handler that runs it in this worker process."""
    for name, runner in RUNNERS.items():
        task = app.tasks[name]
        assert isinstance(task, OmniTask), name
        task.handler = handler_for(runner)
