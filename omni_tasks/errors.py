"""The one error hierarchy of omni-tasks: the core module's errors, plus what a queue needs.

Every class says when it is raised. Producer-side validation errors name the field,
and are raised before anything reaches Redis.

Errors cross the wire as Celery stores them: type name, module and `args` (JSON). Every
class here is rebuilt from its `args` alone (`cls(*args)`), so the caller of
`AsyncResult.get()` gets the same type with the same fields (`docs/wire.md`).
"""

from __future__ import annotations


class CoreModuleError(Exception):
    """Raised for any omni-tasks failure; the base of every error below."""


class SchedulerError(CoreModuleError):
    """Raised when a request cannot be scheduled, routed or looked up."""


class QueueFullError(SchedulerError):
    """Raised when admitting a request would exceed `SchedulerConfig.max_queue_size`."""


class BrokerUnavailableError(SchedulerError):
    """Raised by a send (`.delay()`, `apply_async`, `send_task`, `submit`) when Redis or
    the broker cannot be reached, whatever the client library raised.

    `may_be_accepted` says what the caller may assume. False: nothing of the request
    was recorded or queued, and nothing will run it. True: the connection broke while
    the request was being accepted; it may run. Either way, sending the same request
    again under the same `request_id` is safe: a repeat runs at most once, and its
    result is the one result.
    """

    def __init__(self, request_id: str, message: str, may_be_accepted: bool = False) -> None:
        self.request_id = request_id
        self.message = message
        self.may_be_accepted = may_be_accepted
        super().__init__(request_id, message, may_be_accepted)

    def __str__(self) -> str:
        return self.message


class RequestConflictError(SchedulerError):
    """Raised when a request id is re-used for a different request (its fingerprint,
    the request without its id and creation time, differs from the one accepted under
    that id): refused before anything is enqueued. `field` is "request_id".

    The same request under the same id is an idempotent repeat, not a conflict.
    """

    field = "request_id"

    def __init__(self, request_id: str, message: str | None = None) -> None:
        self.request_id = request_id
        self.message = message or (
            f"{request_id!r} was accepted before for a different request; "
            "send the same request to get its result, or use a new id"
        )
        super().__init__(request_id, self.message)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class CacheError(CoreModuleError):
    """Raised when the DiT cache cannot store or return an entry."""


class ResourceError(CoreModuleError):
    """Raised when a worker has not enough device memory for a request."""


class ProcessingError(CoreModuleError):
    """Raised when a worker fails to run a request."""


class RequestTimeoutError(ProcessingError):
    """Raised when a request runs longer than its timeout (engine-side time limit)."""


class RequestCancelledError(ProcessingError):
    """Raised inside a worker when a running request is revoked: it leaves at the next
    denoising step boundary, and its task ends REVOKED."""


class RequestYieldedError(ProcessingError):
    """Raised inside a diffusion worker when its step scheduler hands back a request it
    holds but has not started, because a higher-priority message waits in the queue; the
    task requeues its message (nothing was computed, nothing is lost)."""


class EngineStoppedError(ProcessingError):
    """Raised inside a worker when its engine shuts down while a request is running.

    The task then hands its message back to the queue instead of failing it.
    """


class ConfigError(CoreModuleError, ValueError):
    """Raised when a configuration value is invalid; `field` names it (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(field, message)  # args round-trip: ConfigError(*args)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class RequestValidationError(CoreModuleError, ValueError):
    """Raised when a request field is invalid; `field` names the first bad field.

    Raised by the producer before enqueueing and by the worker, which rejects and
    records the message instead of running it. Its `args` are `(field, message)`, plus
    `errors` when more than one field is bad, so it crosses the wire intact.
    """

    def __init__(self, field: str, message: str, errors: list[dict] | None = None) -> None:
        self.field = field
        self.message = message
        self.errors = errors or [{"field": field, "message": message}]
        more = (self.errors,) if len(self.errors) > 1 else ()
        super().__init__(field, message, *more)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"
