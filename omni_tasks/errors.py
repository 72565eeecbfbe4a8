"""The one error hierarchy of omni-tasks: the core module's errors, plus what a queue needs.

Every class says when it is raised. Producer-side validation errors name the field,
and are raised before anything reaches Redis.
"""

from __future__ import annotations


class CoreModuleError(Exception):
    """Raised for any omni-tasks failure; the base of every error below."""


class SchedulerError(CoreModuleError):
    """Raised when a request cannot be scheduled, routed or looked up."""


class QueueFullError(SchedulerError):
    """Raised when admitting a request would exceed `SchedulerConfig.max_queue_size`."""


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
        super().__init__(f"{field}: {message}")


class RequestValidationError(CoreModuleError, ValueError):
    """Raised when a request field is invalid; `field` names the first bad field.

    Raised by the producer before enqueueing and by the worker, which rejects and
    records the message instead of running it.
    """

    def __init__(self, field: str, message: str, errors: list[dict] | None = None) -> None:
        self.field = field
        self.errors = errors or [{"field": field, "message": message}]
        super().__init__(f"{field}: {message}")
