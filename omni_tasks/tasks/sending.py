"""The send path: every message an omni-tasks producer sends is accepted here.

`.delay()` and `apply_async` (`OmniTask.send`), a message sent by task name
(`OmniCelery.send_task`, `send_by_name`), each stage of a chain (its first stage from
the producer, the next one from the worker that ran the first), the scheduler (through
`producer.submit`) and a batch (`batch_submit`, which accepts its requests together)
all build their acceptance with `accepting` and publish with `publish`; a single
message is then accepted, published and, if its publish fails, undone by `send`
(`omni_tasks.coordination.acceptance.send`): the request id checked, the request
admitted into its pool, recorded in the ledger and published, all or nothing.

A send holds the request it validated its message into while it publishes
(`request_being_sent`), so the router routes that request without validating the
message again.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, Protocol

from celery import Task
from celery._state import get_current_worker_task

from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination import acceptance, admission, idempotency, ledger
from omni_tasks.requests import OmniRequest
from omni_tasks.tasks.context import ProducerContext
from omni_tasks.tasks.transport import accepts_on_publish

#: Longest `kwargsrepr` (what Flower and the logs show of a message), as Celery's own.
KWARGSREPR_MAX_CHARS = 1024

#: The message a send in this context publishes and the request it was validated into.
_sending: ContextVar[tuple[dict[str, Any], OmniRequest] | None] = ContextVar(
    "omni_sending", default=None
)


class Sender(Protocol):
    """What the send path needs of a task (`OmniTask` has it)."""

    name: str
    takes_previous_result: bool

    @property
    def stage_queue(self) -> str: ...

    @property
    def omni_context(self) -> ProducerContext: ...

    def request_for_send(
        self, args: Any, kwargs: dict[str, Any], task_id: str | None
    ) -> OmniRequest: ...

    def repeat_result(self, request_id: str) -> Any: ...


@contextlib.contextmanager
def sending(message: dict[str, Any], request: OmniRequest | None) -> Iterator[None]:
    """Hold `request` as the validated form of `message` while it is published (with
    no request, hold nothing)."""
    if request is None:
        yield
        return
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


def send(
    task: Sender,
    request: OmniRequest | None,
    message: dict[str, Any],
    args: Any,
    task_id: str,
    options: dict[str, Any],
    publish: Callable[[], Any],
) -> Any:
    """Accept one message and publish it with `publish` (which sends `message` with
    `options`), all or nothing; a failed publish undoes the acceptance. A repeat of a
    request accepted before is not published: its result is returned.

    `request` is what `message` was validated into (None for a chain's later stage
    sent by name, whose request was accepted with its first stage)."""
    accepted_as = accepting(task, args, message, task_id, options, request)
    with sending(message, request):
        return acceptance.send(
            accepted_as,
            publish,
            task.repeat_result,
            on_publish=accepts_on_publish(task.omni_context.config),
        )


def send_by_name(
    task: Sender, send_task: Callable[..., Any], name: str, *args: Any, **options: Any
) -> Any:
    """A message sent by task name (`send_task(name, args, kwargs, ...)`), accepted as
    `.delay()` would: positional args refused, the kwargs validated into the request the
    message then carries (its id the task id, its creation time and seed fixed now),
    then `send`."""
    call_args = args[0] if args else options.pop("args", None)
    call_kwargs = args[1] if len(args) > 1 else options.pop("kwargs", None)
    task_id = options["task_id"] = options.get("task_id") or str(uuid.uuid4())
    request = None
    if task.takes_previous_result:  # a chain's later stage: the request was accepted
        message = call_kwargs or {}
    else:
        request = task.request_for_send(call_args, call_kwargs or {}, task_id)
        message = publish_options(request, options, task.omni_context.config)
    return send(
        task,
        request,
        message,
        call_args,
        task_id,
        options,
        lambda: send_task(name, call_args, message, *args[2:], **options),
    )


def publish(
    task: Task, args: Any, message: dict[str, Any], task_id: str, options: dict[str, Any]
) -> Any:
    """Celery's own publish of `message` as `task`'s (routed, enveloped by the
    transport); run inside `send`, or a batch's acceptance."""
    return Task.apply_async(task, args, message, task_id, **options)


def accepting(
    task: Sender,
    args: Any,
    message: dict[str, Any],
    task_id: str,
    options: dict[str, Any],
    request: OmniRequest | None = None,
) -> acceptance.Acceptance:
    """How a message is accepted: its request id checked (`RequestConflictError`, or
    a repeat), the request it starts counted in its pool (`QueueFullError` when full),
    and recorded in the ledger (Redis broker only: RabbitMQ confirms the publish). A
    chain's later stage is not counted: its first stage was. `options` get the header
    that marks a request an omni-tasks producer accepted.

    A message published by a running task (the next stage of a chain, a replaced
    task), published again (`ledger.REPUBLISHED_HEADER`) or passed on with the mark
    of its first acceptance (`idempotency.ACCEPTED_HEADER`) belongs to a request
    already admitted: its id is not checked, it is counted without the limit, and
    never twice.
    """
    headers = options.get("headers") or {}
    admitted = headers.get(ledger.REPUBLISHED_HEADER) or headers.get(idempotency.ACCEPTED_HEADER)
    enforce = not admitted and get_current_worker_task() is None
    checked = enforce and not task.takes_previous_result
    context = task.omni_context
    entry = None
    if context.config.broker_is_redis:
        entry = ledger.prepare(task.name, task_id, args, message, options)
    accepted_as = acceptance.Acceptance(
        context.redis,
        context.config,
        task.stage_queue,
        admission.final_task_id(task_id, options),
        enforce=enforce,
        counted=not task.takes_previous_result,
        entry=entry,
        fingerprint=request.fingerprint() if checked and request is not None else None,
    )
    options["headers"] = {**headers, idempotency.ACCEPTED_HEADER: True}
    return accepted_as


def kwargs_repr(message: dict[str, Any]) -> str:
    """The message as Flower shows it: JSON, an input image by its size only.

    Celery would build it with `saferepr`, which costs more than the rest of a send.
    """
    shown = dict(message)
    if isinstance(shown.get("image"), str):
        shown["image"] = f"<{len(shown['image'])} chars of base64>"
    return json.dumps(shown)[:KWARGSREPR_MAX_CHARS]


def publish_options(
    request: OmniRequest, options: dict[str, Any], config: CoreModuleConfig
) -> dict[str, Any]:
    """Set what Flower shows of the message and when it expires (under `config`'s cap)
    in `options`; returns the message (the task's kwargs)."""
    message = request.to_message()
    options.setdefault("kwargsrepr", kwargs_repr(message))
    deadline = request_deadline(request, config.request_time_cap_s)
    if deadline is not None:
        options.setdefault("expires", datetime.fromtimestamp(deadline, timezone.utc))
    return message


def request_deadline(request: OmniRequest, cap_s: float) -> float | None:
    """When a request with a `timeout_s` stops being worth running: its creation plus
    its timeout, at most `cap_s` (the config's `request_time_cap_s`). Its message
    expires then, so a worker never starts it late; None for a request without a
    timeout."""
    if request.timeout_s is None:
        return None
    return request.created_at + min(request.timeout_s, cap_s)
