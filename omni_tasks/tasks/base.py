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

from collections.abc import Callable
from typing import Any

from celery import Task

from omni_tasks.config import Registries
from omni_tasks.errors import ProcessingError, RequestValidationError
from omni_tasks.model_registry import check_model
from omni_tasks.requests import OmniRequest, RequestType, Stage, request_from_task_kwargs
from omni_tasks.tasks import sending
from omni_tasks.tasks.context import ProducerContext, producer_context

#: Why positional args are refused (`RequestValidationError`, field "args").
POSITIONAL_REFUSED = "positional args are refused: pass the fields as keyword arguments (kwargs)"

#: Runs one message on a worker: (task, kwargs, previous stage's result, positional args
#: other than that result) -> result JSON.
TaskHandler = Callable[
    ["OmniTask", dict[str, Any], "dict[str, Any] | None", tuple[Any, ...]], dict[str, Any]
]


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
        """Validate a message's kwargs into its request: an entry point, so its LoRA names
        are checked against the config's registries (the validation context's
        `Registries`) and its `model` too (`model_registry.check_model`). With `task_id`
        (the id it is sent or delivered under) the request id is the task's."""
        if not isinstance(kwargs, dict):
            raise RequestValidationError("kwargs", "request fields must be keyword arguments")
        if task_id:
            kwargs = with_request_id(kwargs, task_id.removesuffix(self.id_suffix))
        config = self.omni_context.config
        registries = Registries.from_config(config)
        request = request_from_task_kwargs(self.request_type_for(kwargs), kwargs, registries)
        check_model(request, config)
        return request

    def request_for_send(
        self, args: Any, kwargs: dict[str, Any], task_id: str | None
    ) -> OmniRequest:
        """The request a send of (`args`, `kwargs`) carries: positional args are refused
        unless this is a chain's later stage (they hold the previous stage's result)."""
        if args and not self.takes_previous_result:
            raise RequestValidationError("args", POSITIONAL_REFUSED)
        return self.build_request(kwargs, task_id)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        **options: Any,
    ) -> Any:
        return self.send(self.request_for_send(args, kwargs or {}, task_id), args, task_id, options)

    def send(self, request: OmniRequest, args: Any, task_id: str | None, options: dict) -> Any:
        """Enqueue a validated request as this task's message (its id is the task id)
        through the send path (`sending.send`): accepted and published, all or nothing.
        A repeat of a request accepted before is not published: its result is returned."""
        message = sending.publish_options(request, options, self.omni_context.config)
        task_id = task_id or request.request_id
        return sending.send(
            self,
            request,
            message,
            args,
            task_id,
            options,
            lambda: sending.publish(self, args, message, task_id, options),
        )

    def repeat_result(self, request_id: str) -> Any:
        """The result of a send that repeated a request accepted before: nothing was
        published; `repeat` says so (a re-routed message is then a duplicate)."""
        result = self.app.AsyncResult(request_id)
        result.repeat = True
        return result

    @property
    def stage_queue(self) -> str:
        """The pool queue of this task's stage (its counters are kept under this name).

        Not Celery's `Task.queue`, which would override the router for every message.
        """
        return self.omni_context.config.pool_for(self.stage).queue

    @property
    def omni_context(self) -> ProducerContext:
        """The config and Redis client this task sends with: its app's."""
        return producer_context(self.app)

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
