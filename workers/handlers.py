"""What a task body runs on a worker: the handler registered for each task name.

Every handler trusts nothing. For a message that came back it checks cancellation and
caps redeliveries (a message that keeps killing workers); it validates the message
again (positional args, the request id against the task id, every field), rejecting
and recording what does not parse; for a first delivery that no omni-tasks producer
accepted (another client's), it checks the request id (`coordination.idempotency`); it
claims the request's one run (`coordination.runs`: a duplicate of a request that
succeeded or runs elsewhere is acknowledged without running); it runs the stage on this
worker's engines, as STARTED; it hands the message back if the engine is
shutting down; and it counts the outcome for monitoring.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import redis
from celery import Celery, states
from celery.exceptions import Ignore, Reject

from omni_tasks.coordination import idempotency, runs
from omni_tasks.coordination.counters import count_outcome
from omni_tasks.coordination.ledger import REPUBLISHED_HEADER
from omni_tasks.coordination.rejections import record_rejection
from omni_tasks.errors import (
    EngineStoppedError,
    ProcessingError,
    RequestCancelledError,
    RequestConflictError,
    RequestTimeoutError,
    RequestValidationError,
    RequestYieldedError,
)
from omni_tasks.requests import OmniRequest
from omni_tasks.results import ProbeResult
from omni_tasks.tasks.base import POSITIONAL_REFUSED, OmniTask, TaskHandler
from omni_tasks.tasks.celery_app import delivered_level
from omni_tasks.tasks.definitions import multimodal_chain
from omni_tasks.tasks.result_backend import encoded_state
from workers import execution, progress, speech, task_context
from workers.lifecycle.heartbeat import HEARTBEAT_INTERVAL_S
from workers.runtime import runtime

log = logging.getLogger(__name__)

DELIVERY_KEY_TTL_S = 7 * 86400
#: How long a new run claim counts as live before its worker's held set lists it: two
#: beats, under the age at which the reaper gives an unheld message back.
CLAIM_GRACE_S = 2 * HEARTBEAT_INTERVAL_S
#: What gives a running request's message back to the queue rather than failing it.
LOST_REDIS = (redis.ConnectionError, redis.TimeoutError)
HANDED_BACK = (EngineStoppedError, RequestYieldedError, *LOST_REDIS)
#: Runs a task's stage: the validated request and the previous stage's result -> a
#: typed result (`omni_tasks.results`).
StageRunner = Callable[[OmniRequest, "dict[str, Any] | None"], Any]


def handler_for(runner: StageRunner) -> TaskHandler:
    def handle(
        task: OmniTask,
        kwargs: dict[str, Any],
        previous: dict[str, Any] | None,
        args: tuple[Any, ...] = (),
    ) -> Any:
        return execute(task, kwargs, lambda request: runner(request, previous), args)

    return handle


def execute(
    task: OmniTask,
    kwargs: dict[str, Any],
    run: Callable[[OmniRequest], Any],
    args: tuple[Any, ...] = (),
) -> dict[str, Any]:
    """Run one message of `task` (see the module docstring); returns the result's JSON."""
    started = time.time()
    task_id = task.request.id or ""
    queue = task.stage_queue
    redelivered = False
    try:
        request, redelivered = admitted_request(task, task_id, queue, kwargs, args)
        claim = claim_run(task, task_id, queue, taking_over=redelivered)
    except LOST_REDIS as exc:
        # Redis went away before the run (a restart, a Sentinel failover): not the
        # request's fault; give the message back as a lost run does (`run_claimed`).
        if redelivered:
            with contextlib.suppress(redis.RedisError):
                runtime.redis.decr(runtime.keys.deliveries(task_id))
        raise Reject(str(exc), requeue=True) from None
    succeeded = False
    try:
        result = run_claimed(task, task_id, queue, request, run)
        run_s = time.time() - started
        timings = result.timings
        timings.setdefault("queued_s", round(max(0.0, started - request.created_at), 6))
        timings.setdefault("run_s", round(run_s, 6))
        timings.setdefault("started_at", round(started, 6))
        own_queued, own_run = stage_times(result, task.stage)
        runtime.counters.add_success(queue, own_run, own_queued, request.request_type.value)
        if redelivered:
            runtime.redis.delete(runtime.keys.deliveries(task_id))
        found = result.to_json()
        succeeded = True
        return found
    finally:
        if not succeeded:  # the message may come back, or be sent again: it may run
            with contextlib.suppress(redis.RedisError):
                runs.release(runtime.redis, task_id, claim)


def stage_times(result: Any, stage: str) -> tuple[float, float]:
    """(queued_s, run_s) of this pool's own stage, for its counters: a multimodal
    result's `timings` span both stages, its `stages` hold each one's."""
    own = (getattr(result, "stages", None) or {}).get(stage)
    if own:
        return float(own["queued_s"]), float(own["run_s"])
    return float(result.timings["queued_s"]), float(result.timings["run_s"])


def run_claimed(
    task: OmniTask, task_id: str, queue: str, request: OmniRequest, run: Callable[..., Any]
) -> Any:
    """Run the request this delivery claimed (STARTED); what ends it otherwise becomes
    the task's outcome (handed back, expired, cancelled or failed)."""
    try:
        level = delivered_level(
            (task.request.delivery_info or {}).get("priority"), runtime.config.broker_is_redis
        )
        with (
            task_context.running(task_id, level),
            progress.reporting(
                task, runtime.config.progress_interval_s, runtime.config.progress_first_after_s
            ),
        ):
            return run(request)
    except HANDED_BACK as exc:
        # A warm shutdown, an unstarted request handed back for higher-priority work, or
        # Redis gone mid-run (a restart): not the request's fault, so give the message
        # back; the credit cancels the count the redelivered message will add when it
        # starts again.
        with contextlib.suppress(redis.RedisError):
            runtime.redis.decr(runtime.keys.deliveries(task_id))
        raise Reject(str(exc), requeue=True) from None
    except RequestTimeoutError:
        count_outcome(runtime.redis, queue, "expired")
        raise
    except RequestCancelledError:
        task.backend.mark_as_revoked(task_id, "cancelled while running", request=task.request)
        count_outcome(runtime.redis, queue, "cancelled")
        raise Ignore() from None
    except Exception:
        count_outcome(runtime.redis, queue, "failed")
        raise


def claim_run(task: OmniTask, task_id: str, queue: str, taking_over: bool) -> str:
    """Claim the one run of `task_id` (`coordination.runs`) and mark it STARTED, in one
    step; returns the claim. A delivery whose request succeeded already, or (unless it
    is a message given back, `taking_over`) whose twin a live worker runs, is a
    duplicate: acknowledged without running (`Ignore`), counted as `duplicates`; its
    sender gets the one result, under the same id. (Celery's own `track_started` would
    store STARTED before: a duplicate's or a conflicting message's over the state of the
    request that runs.)"""
    claim = runs.claim_value(runtime.hostname, runtime.instance)
    backend = task.backend
    meta = {"pid": os.getpid(), "hostname": task.request.hostname}
    started = encoded_state(backend, task_id, meta, states.STARTED, task.request)
    result = (backend.get_key_for_task(task_id).decode(), started, int(backend.expires))
    claim_s = runs.claim_ttl_s(runtime.config.longest_task_s)
    found = runs.claim(runtime.redis, task_id, claim, result, CLAIM_GRACE_S, claim_s, taking_over)
    if found != "claimed":
        count_outcome(runtime.redis, queue, "duplicates")
        log.info("%s: a duplicate (%s), not run", task_id, found)
        raise Ignore()
    return claim


def become_chain(
    task: OmniTask,
    kwargs: dict[str, Any],
    previous: dict[str, Any] | None,
    args: tuple[Any, ...] = (),
) -> NoReturn:
    """`generate_multimodal` sent by name: replaced by the two-stage chain, whose last
    task has the message's id, so the caller's result is the chain's final one."""
    task_id = task.request.id or ""
    request, _ = admitted_request(task, task_id, task.stage_queue, kwargs, args)
    raise task.replace(multimodal_chain(request))


def admitted_request(
    task: OmniTask, task_id: str, queue: str, kwargs: Any, args: tuple[Any, ...]
) -> tuple[OmniRequest, bool]:
    """The request of a message that may run, and whether it was delivered before.
    Raises (after recording why) for one that must not: see the module docstring."""
    redelivered = bool((task.request.delivery_info or {}).get("redelivered")) or bool(
        getattr(task.request, REPUBLISHED_HEADER, False)
    )
    if redelivered:
        _admit_redelivery(task, task_id, kwargs, queue)
    try:
        if args:
            raise RequestValidationError("args", POSITIONAL_REFUSED)
        request = task.build_request(kwargs, task_id)
    except RequestValidationError as exc:
        body = {"args": list(args), "kwargs": kwargs} if args else kwargs
        _record_failure(task, task_id, queue, str(exc), body)
        raise
    if not redelivered:
        _check_request_id(task, task_id, request, queue, kwargs)
    return request, redelivered


def _skip_if_succeeded(task: OmniTask, task_id: str, queue: str) -> None:
    """A duplicate of a request that already succeeded is not run: the first result
    stands (`Ignore`), and it counts as `duplicates`."""
    if task.backend.get_task_meta(task_id).get("status") == states.SUCCESS:
        count_outcome(runtime.redis, queue, "duplicates")
        raise Ignore()


def _check_request_id(
    task: OmniTask, task_id: str, request: OmniRequest, queue: str, kwargs: Any
) -> None:
    """A first delivery that no omni-tasks producer accepted (another client sent it):
    claim its id's fingerprint. A repeat goes on to claim the run (`claim_run`: it runs
    only if no twin ran it to success or runs it now); a conflict is refused and
    recorded, and no state is stored: the request the id holds (running, or its
    result) stands, and its sender sees only its own states."""
    accepted = getattr(task.request, idempotency.ACCEPTED_HEADER, False)
    if accepted or task.takes_previous_result or not task_id:
        return
    ttl_s = int(runtime.config.result_expires)
    found = idempotency.claim(runtime.redis, request.request_id, request.fingerprint(), ttl_s)
    if found == "new":
        return
    if found == "repeat":  # a duplicate unless its twin ended without success
        return
    conflict = RequestConflictError(request.request_id)
    _record_failure(task, task_id, queue, str(conflict), kwargs)
    raise Ignore()  # the id's own request (running, or its result) stands


def _admit_redelivery(task: OmniTask, task_id: str, kwargs: Any, queue: str) -> None:
    """A message that came back (worker died, shutdown, visibility timeout, the reaper):
    skip it if its request is already done (a duplicate: the first result stands) or was
    cancelled meanwhile; refuse it after `max_redeliveries` returns.

    First deliveries skip these round trips: Celery's revoked list covers them (and
    workers load the Redis revocations when they start).
    """
    _skip_if_succeeded(task, task_id, queue)
    revoked, returns = runtime.redis.scripts.admit_redelivery(
        keys=[runtime.keys.revoked(task_id), runtime.keys.deliveries(task_id)],
        args=[DELIVERY_KEY_TTL_S],
    )
    if revoked:
        task.backend.mark_as_revoked(task_id, "cancelled before it ran", request=task.request)
        count_outcome(runtime.redis, queue, "cancelled")
        raise Ignore()
    cap = runtime.config.max_redeliveries
    if int(returns) > cap:
        reason = f"redelivered {returns} times (max_redeliveries={cap}); giving up"
        _record_failure(task, task_id, queue, reason, kwargs)
        raise ProcessingError(reason)


def _record_failure(task: OmniTask, task_id: str, queue: str, reason: str, body: Any) -> None:
    """A message refused without running: kept in the rejected list, counted as failed."""
    record_rejection(
        runtime.redis, reason, task_id=task_id, task_name=task.name, queue=queue, body=body
    )
    count_outcome(runtime.redis, queue, "failed")


def _probe(request: OmniRequest, previous: dict[str, Any] | None) -> ProbeResult:
    return ProbeResult(request_id=request.request_id)


#: Task name -> what its body runs.
RUNNERS: Mapping[str, StageRunner] = {
    "omni_tasks.generate_text": lambda request, _: execution.run_text(request),
    "omni_tasks.generate_chat": lambda request, _: execution.run_text(request),
    "omni_tasks.generate_image": lambda request, _: execution.run_image(request),
    "omni_tasks.generate_video": lambda request, _: execution.run_video(request),
    "omni_tasks.generate_audio": lambda request, _: execution.run_audio(request),
    "omni_tasks.generate_speech": lambda request, _: speech.run_speech(request),
    "omni_tasks.multimodal_prompt": lambda request, _: execution.run_multimodal_prompt(request),
    "omni_tasks.multimodal_render": execution.run_multimodal_render,
    "omni_tasks.probe": _probe,
}


def handlers() -> dict[str, TaskHandler]:
    """Task name -> its handler: every task body hands its message to one."""
    found: dict[str, TaskHandler] = {name: handler_for(r) for name, r in RUNNERS.items()}
    found["omni_tasks.generate_multimodal"] = become_chain
    return found


def register_handlers(app: Celery) -> None:
    """Give each task of `app` the handler that runs it in this worker process."""
    for name, handler in handlers().items():
        task = app.tasks[name]
        assert isinstance(task, OmniTask), name
        task.handler = handler
