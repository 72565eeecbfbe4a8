"""The task class every omni-tasks task uses: the producer half of the contract.

`apply_async` (and so `.delay`) validates the kwargs into an `OmniRequest` before
anything is sent and uses the request id as the task id; the router then picks the
queue and priority. A task's name and message are the contract: its body runs the
`handler` that the worker side registered for it (`workers.entry`, loaded only by
worker processes), so this module never reaches into the worker side.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import redis
from celery import Task
from celery._state import get_current_worker_task
from kombu.utils.url import maybe_sanitize_url

from omni_tasks.config import get_config
from omni_tasks.coordination import admission, ledger
from omni_tasks.errors import ProcessingError, RequestValidationError, SchedulerError
from omni_tasks.requests import OmniRequest, RequestType, Stage, request_from_task_kwargs

#: Longest `kwargsrepr` (what Flower and the logs show of a message), as Celery's own.
KWARGSREPR_MAX_CHARS = 1024

#: Runs one message on a worker: (task, kwargs, previous stage's result) -> result JSON.
TaskHandler = Callable[["OmniTask", dict[str, Any], "dict[str, Any] | None"], dict[str, Any]]


class OmniTask(Task):
    """Base of the omni-tasks tasks; `request_type` and `stage` are set per task."""

    abstract = True
    typing = False  # the request model validates (and names the bad field)
    request_type: RequestType | None = None
    stage: Stage = "ar"
    #: True for a chain's later stage, which receives the previous stage's result.
    takes_previous_result = False
    #: Set on worker processes by `workers.entry`; None in an application process.
    handler: TaskHandler | None = None

    def request_type_for(self, kwargs: dict[str, Any]) -> RequestType:
        if self.request_type is None:
            raise NotImplementedError("tasks without a fixed request_type decide per message")
        return self.request_type

    def build_request(self, kwargs: dict[str, Any]) -> OmniRequest:
        if not isinstance(kwargs, dict):
            raise RequestValidationError("kwargs", "request fields must be keyword arguments")
        return request_from_task_kwargs(self.request_type_for(kwargs), kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        **options: Any,
    ) -> Any:
        if args and not self.takes_previous_result:
            raise RequestValidationError("args", "pass request fields as keyword arguments")
        return self.send(self.build_request(kwargs or {}), args, task_id, options)

    def send(self, request: OmniRequest, args: Any, task_id: str | None, options: dict) -> Any:
        """Enqueue a validated request as this task's message (its id is the task id):
        accepted first (admitted, and recorded in the ledger, in one round trip:
        `omni_tasks.coordination.admission`), then published."""
        message = request.to_message()
        options.setdefault("kwargsrepr", kwargs_repr(message))
        deadline = request_deadline(request)
        if deadline is not None:
            options.setdefault("expires", datetime.fromtimestamp(deadline, timezone.utc))
        task_id = task_id or request.request_id
        accepted = self.accept(args, message, task_id, options)
        try:
            with admission.admitted_here():
                return super().apply_async(args, message, task_id=task_id, **options)
        except BaseException:
            with contextlib.suppress(redis.RedisError):
                accepted.undo()  # nothing was enqueued: the place goes back
            raise

    def accept(
        self, args: Any, kwargs: dict[str, Any], task_id: str, options: dict
    ) -> admission.Admission:
        """Count the request this message starts in its pool (`QueueFullError` when
        full) and record it in the ledger (Redis broker only: RabbitMQ confirms the
        publish). A chain's later stage is not counted: its first stage was.

        A message published by a running task (the next stage of a chain, a replaced
        task) or published again (`ledger.REPUBLISHED_HEADER`) belongs to a request
        already admitted: it is counted without the limit, and never twice.
        """
        republished = bool((options.get("headers") or {}).get(ledger.REPUBLISHED_HEADER))
        enforce = not republished and get_current_worker_task() is None
        entry = None
        if get_config().broker_is_redis:
            entry = ledger.prepare(self.name, task_id, args, kwargs, options)
        try:
            return admission.admit(
                self.stage_queue,
                admission.final_task_id(task_id, options),
                enforce=enforce,
                counted=not self.takes_previous_result,
                entry=entry,
            )
        except redis.RedisError as exc:
            raise SchedulerError(_unreachable(exc)) from exc

    @property
    def stage_queue(self) -> str:
        """The pool queue of this task's stage (its counters are kept under this name).

        Not Celery's `Task.queue`, which would override the router for every message.
        """
        return get_config().pool_for(self.stage).queue

    def run_on_worker(
        self, kwargs: dict[str, Any], previous: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The task body: hand the message to the worker side's handler."""
        if self.handler is None:
            raise ProcessingError(
                f"{self.name} runs only in an omni-tasks worker "
                "(celery -A omni_tasks worker), which registers its handler"
            )
        return self.handler(self, kwargs, previous)


def _unreachable(exc: redis.RedisError) -> str:
    url = maybe_sanitize_url(get_config().redis_url)
    return f"request not accepted: cannot reach Redis at {url}: {exc}"


def kwargs_repr(message: dict[str, Any]) -> str:
    """The message as Flower shows it: JSON, an input image by its size only.

    Celery would build it with `saferepr`, which costs more than the rest of a send.
    """
    shown = dict(message)
    if isinstance(shown.get("image"), str):
        shown["image"] = f"<{len(shown['image'])} chars of base64>"
    return json.dumps(shown)[:KWARGSREPR_MAX_CHARS]


def request_deadline(request: OmniRequest) -> float | None:
    """When a request with a `timeout_s` stops being worth running: its creation plus
    its timeout (capped by the config). Its message expires then, so a worker never
    starts it late; None for a request without a timeout."""
    if request.timeout_s is None:
        return None
    return request.created_at + min(request.timeout_s, get_config().request_time_cap_s)
