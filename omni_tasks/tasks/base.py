"""The task class every omni-tasks task uses: the producer half of the contract.

`apply_async` (and so `.delay`) validates the kwargs into an `OmniRequest` before
anything is sent and uses the request id as the task id; the router then picks the
queue and priority. A task's name and message are the contract (`docs/wire.md`): its
body runs the `handler` that the worker side registered for it (`workers.entry`, loaded
only by worker processes), so this module never reaches into the worker side.

The request id is the task id on both sides: a message without `request_id` takes the
task id, one with another id is refused (`RequestValidationError`, field `request_id`).
A request id already accepted is checked by `omni_tasks.coordination.idempotency`: the
same request again is a repeat (nothing is published; the caller gets the id's
result), a different one raises `RequestConflictError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

from celery import Task
from celery._state import get_current_worker_task

from omni_tasks.config import get_config
from omni_tasks.coordination import acceptance, admission, idempotency, ledger
from omni_tasks.errors import ProcessingError, RequestValidationError
from omni_tasks.model_registry import check_model
from omni_tasks.requests import OmniRequest, RequestType, Stage, request_from_task_kwargs
from omni_tasks.tasks.transport import accepts_on_publish

#: Longest `kwargsrepr` (what Flower and the logs show of a message), as Celery's own.
KWARGSREPR_MAX_CHARS = 1024

#: Why positional args are refused (`RequestValidationError`, field "args").
POSITIONAL_REFUSED = "positional args are refused: pass the fields as keyword arguments (kwargs)"

#: Runs one message on a worker: (task, kwargs, previous stage's result, positional args
#: other than that result) -> result JSON.
TaskHandler = Callable[
    ["OmniTask", dict[str, Any], "dict[str, Any] | None", tuple[Any, ...]], dict[str, Any]
]

#: The message a send in this context publishes and the request it was validated into:
#: the router takes that request rather than validating the message again.
_sending: ContextVar[tuple[dict[str, Any], OmniRequest] | None] = ContextVar(
    "omni_sending", default=None
)


@contextmanager
def sending(message: dict[str, Any], request: OmniRequest) -> Iterator[None]:
    """Hold `request` as the validated form of `message` while it is published."""
    token = _sending.set((message, request))
    try:
        yield
    finally:
        _sending.reset(token)


def request_being_sent(message: Any) -> OmniRequest | None:
    """The request `message` (the very kwargs object) was validated into by the send
    publishing it in this context; None for any other message."""
    found = _sending.get()
    return found[1] if found is not None and found[0] is message else None


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
    #: What a task id adds to its request id (a MULTIMODAL chain's AR stage: ".prompt").
    id_suffix = ""

    def request_type_for(self, kwargs: dict[str, Any]) -> RequestType:
        if self.request_type is None:
            raise NotImplementedError("tasks without a fixed request_type decide per message")
        return self.request_type

    def build_request(self, kwargs: dict[str, Any], task_id: str | None = None) -> OmniRequest:
        """Validate a message's kwargs into its request, its diffusion `model` against the
        config's registry (`model_registry.check_model`). With `task_id` (the id it is
        sent or delivered under) the request id is the task's (`with_request_id`)."""
        if not isinstance(kwargs, dict):
            raise RequestValidationError("kwargs", "request fields must be keyword arguments")
        if task_id:
            kwargs = with_request_id(kwargs, task_id.removesuffix(self.id_suffix))
        request = request_from_task_kwargs(self.request_type_for(kwargs), kwargs)
        check_model(request, get_config())
        return request

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        **options: Any,
    ) -> Any:
        if args and not self.takes_previous_result:
            raise RequestValidationError("args", POSITIONAL_REFUSED)
        return self.send(self.build_request(kwargs or {}, task_id), args, task_id, options)

    def send(self, request: OmniRequest, args: Any, task_id: str | None, options: dict) -> Any:
        """Enqueue a validated request as this task's message (its id is the task id):
        its id checked, admitted, recorded in the ledger and published, all or nothing
        (`omni_tasks.coordination.acceptance`). A repeat of a request accepted before is
        not published: its result is returned."""
        message = publish_options(request, options)
        task_id = task_id or request.request_id
        accepting = self.acceptance_for(args, message, task_id, options, request)
        with sending(message, request):
            return self.publish_accepted(
                accepting,
                options,
                lambda: super(OmniTask, self).apply_async(
                    args, message, task_id=task_id, **options
                ),
            )

    def publish_accepted(
        self, accepting: acceptance.Acceptance, options: dict, publish: Callable[[], Any]
    ) -> Any:
        """Run `publish` (which sends the message with `options`) as `accepting`'s send;
        the message carries the mark of a request an omni-tasks producer accepted."""
        options["headers"] = {**(options.get("headers") or {}), idempotency.ACCEPTED_HEADER: True}
        return acceptance.send(
            accepting, publish, self.repeat_result, on_publish=accepts_on_publish()
        )

    def repeat_result(self, request_id: str) -> Any:
        """The result of a send that repeated a request accepted before: nothing was
        published; `repeat` says so (a re-routed message is then a duplicate)."""
        result = self.app.AsyncResult(request_id)
        result.repeat = True
        return result

    def acceptance_for(
        self,
        args: Any,
        kwargs: dict[str, Any],
        task_id: str,
        options: dict,
        request: OmniRequest | None = None,
    ) -> acceptance.Acceptance:
        """How a message is accepted: its request id checked (`RequestConflictError`, or
        a repeat), the request this message starts counted in its pool
        (`QueueFullError` when full), and recorded in the ledger (Redis broker only:
        RabbitMQ confirms the publish). A chain's later stage is not counted: its first
        stage was.

        A message published by a running task (the next stage of a chain, a replaced
        task), published again (`ledger.REPUBLISHED_HEADER`) or passed on with the mark
        of its first acceptance (`idempotency.ACCEPTED_HEADER`) belongs to a request
        already admitted: its id is not checked, it is counted without the limit, and
        never twice.
        """
        headers = options.get("headers") or {}
        # A message that carries a producer's mark (a worker passes it on to its
        # model's queue) was accepted already, as was one published again.
        accepted = headers.get(ledger.REPUBLISHED_HEADER) or headers.get(
            idempotency.ACCEPTED_HEADER
        )
        enforce = not accepted and get_current_worker_task() is None
        checked = enforce and not self.takes_previous_result
        entry = None
        if get_config().broker_is_redis:
            entry = ledger.prepare(self.name, task_id, args, kwargs, options)
        return acceptance.Acceptance(
            self.stage_queue,
            admission.final_task_id(task_id, options),
            enforce=enforce,
            counted=not self.takes_previous_result,
            entry=entry,
            fingerprint=request.fingerprint() if checked and request is not None else None,
        )

    @property
    def stage_queue(self) -> str:
        """The pool queue of this task's stage (its counters are kept under this name).

        Not Celery's `Task.queue`, which would override the router for every message.
        """
        return get_config().pool_for(self.stage).queue

    def run_on_worker(
        self,
        kwargs: dict[str, Any],
        previous: dict[str, Any] | None = None,
        args: tuple[Any, ...] = (),
    ) -> dict[str, Any]:
        """The task body: hand the message to the worker side's handler (`args`: the
        positional args a client sent, which the handler refuses)."""
        if self.handler is None:
            raise ProcessingError(
                f"{self.name} runs only in an omni-tasks worker "
                "(celery -A omni_tasks worker), which registers its handler"
            )
        return self.handler(self, kwargs, previous, args)


def with_request_id(kwargs: dict[str, Any], request_id: str) -> dict[str, Any]:
    """`kwargs` with `request_id` set to the id the message is sent or delivered under:
    a message without one takes it; one with another id is refused."""
    given = kwargs.get("request_id")
    if given is None:
        return {**kwargs, "request_id": request_id}
    if given != request_id:
        shown = repr(given)[:140]
        raise RequestValidationError(
            "request_id", f"must be the task id {request_id!r} or left out, got {shown}"
        )
    return kwargs


def kwargs_repr(message: dict[str, Any]) -> str:
    """The message as Flower shows it: JSON, an input image by its size only.

    Celery would build it with `saferepr`, which costs more than the rest of a send.
    """
    shown = dict(message)
    if isinstance(shown.get("image"), str):
        shown["image"] = f"<{len(shown['image'])} chars of base64>"
    return json.dumps(shown)[:KWARGSREPR_MAX_CHARS]


def publish_options(request: OmniRequest, options: dict[str, Any]) -> dict[str, Any]:
    """Set what Flower shows of the message and when it expires in `options`; returns
    the message (the task's kwargs)."""
    message = request.to_message()
    options.setdefault("kwargsrepr", kwargs_repr(message))
    deadline = request_deadline(request)
    if deadline is not None:
        options.setdefault("expires", datetime.fromtimestamp(deadline, timezone.utc))
    return message


def request_deadline(request: OmniRequest) -> float | None:
    """When a request with a `timeout_s` stops being worth running: its creation plus
    its timeout (capped by the config). Its message expires then, so a worker never
    starts it late; None for a request without a timeout."""
    if request.timeout_s is None:
        return None
    return request.created_at + min(request.timeout_s, get_config().request_time_cap_s)
