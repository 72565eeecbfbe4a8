"""Errors on the wire, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure a client can meet maps here, so the official SDKs raise their own
exception types: 400 for an invalid request, naming the parameter as the client spells
it (`param`, and the message's start), 401 without the bearer token, 404, 409 (an
`Idempotency-Key` used for another body), 413 over the body limit, 429 with
`Retry-After` when admission refuses, 503 when no live worker serves the pool or Redis
cannot be reached (saying whether the request may have been accepted), 504 on timeout,
500 for the rest. No handler ever sends a traceback: an unexpected error is logged
(`middleware.CatchAll`) and answered with its type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError as BodyValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from omni_tasks.api.context import config_of
from omni_tasks.errors import (
    BrokerUnavailableError,
    ConfigError,
    CoreModuleError,
    QueueFullError,
    RequestConflictError,
    RequestTimeoutError,
    RequestValidationError,
    ResourceError,
    SchedulerError,
)

#: The `type` OpenAI gives each status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class APIError(Exception):
    """An error answered as `status` with OpenAI's body (and `headers`)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def invalid(field: str, message: str, status: int = 400) -> APIError:
    """A bad field of the request body."""
    return APIError(status, f"{field}: {message}", param=field, code="invalid_value")


def request_error(exc: RequestValidationError, names: Mapping[str, str] | None = None) -> APIError:
    """400 for a bad request field, named as the endpoint spells it: `names` maps the
    request's fields to the endpoint's (`steps` -> `num_inference_steps`). A parameter
    that carries several fields (`size`: width and height) says which one was wrong."""
    names = names or {}
    param = names.get(exc.field, exc.field)
    message = exc.message
    if param != exc.field and list(names.values()).count(param) > 1:
        message = f"the {exc.field} {message.removeprefix('Input ')}"
    return invalid(param, message)


def from_core_error(exc: CoreModuleError, retry_after_s: float, keyed: bool = False) -> APIError:
    """The HTTP answer to an error raised while accepting a request (`retry_after_s`: a
    full queue's `Retry-After`, `api.retry_after_s`; `keyed`: the call came with an
    `Idempotency-Key`)."""
    if isinstance(exc, RequestValidationError):
        return request_error(exc)
    if isinstance(exc, QueueFullError):
        retry = str(retry_after_s)
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": retry})
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, str(exc), code="timeout")
    if isinstance(exc, ConfigError):
        return APIError(400, str(exc), param=exc.field, code="invalid_value")
    if isinstance(exc, ResourceError):
        return APIError(400, str(exc), code="resource_exceeded")
    if isinstance(exc, BrokerUnavailableError):
        return broker_unavailable(exc, keyed)
    if isinstance(exc, RequestConflictError):
        return APIError(409, str(exc), param="request_id", code="request_conflict")
    if isinstance(exc, SchedulerError):
        return APIError(503, str(exc), code="unavailable", headers={"Retry-After": "5"})
    return APIError(500, str(exc), code="server_error")


def broker_unavailable(exc: BrokerUnavailableError, keyed: bool) -> APIError:
    """503 for a send that could not reach Redis: whether the request may have been
    accepted, and whether retrying is safe (always, with the same `Idempotency-Key`)."""
    if not exc.may_be_accepted:
        outcome = "nothing was accepted and nothing will run; retrying is safe"
    elif keyed:
        outcome = (
            "it may have been accepted and may run; retrying with the same "
            "Idempotency-Key is safe: it runs at most once and answers its one result"
        )
    else:
        outcome = (
            "it may have been accepted and may run; a retry may run it twice: send an "
            "Idempotency-Key to retry safely"
        )
    message = f"request {exc.request_id} not sent: the queue's Redis cannot be reached; {outcome}"
    return APIError(503, message, code="broker_unavailable", headers={"Retry-After": "5"})


def waited_too_long(timeout_s: float, request_ids: list[str], kept: bool = False) -> APIError:
    """504: no result within `api.wait_timeout_s`. The requests were cancelled, or, for
    a call with an `Idempotency-Key` (`kept`), still run for its retry to answer."""
    ids = ", ".join(request_ids)
    waited = f"no result within {timeout_s:g}s (api.wait_timeout_s)"
    if kept:
        message = (
            f"{waited}; request {ids} still runs: send the call again with the same "
            "Idempotency-Key to get its result"
        )
        return APIError(504, message, code="timeout")
    return APIError(504, f"{waited}; cancelled request {ids}", code="timeout")


#: Worker-side failures (the `exc_type` a FAILURE result names) -> (status, code).
FAILURE_STATUS = {
    "RequestValidationError": (400, "invalid_value"),
    "ResourceError": (400, "resource_exceeded"),
    "RequestTimeoutError": (504, "timeout"),
    "TimeLimitExceeded": (504, "timeout"),
    "SoftTimeLimitExceeded": (504, "timeout"),
    "TaskRevokedError": (409, "cancelled"),
}


def from_failure(result: Any, task_id: str) -> APIError:
    """The HTTP answer to a request a worker failed: its error's type and message, never
    its traceback (which the result backend keeps apart)."""
    exc_type, message = failure_of(result)
    status, code = FAILURE_STATUS.get(exc_type, (500, "processing_error"))
    if exc_type == "TaskRevokedError" and "expired" in message:  # its timeout_s passed
        status, code = 504, "timeout"
    return APIError(status, f"request {task_id} failed: {exc_type}: {message}", code=code)


#: Errors stored with args [field, message, ...] (docs/wire.md): "field: message".
FIELD_ERRORS = ("RequestValidationError", "ConfigError", "RequestConflictError")


def failure_of(result: Any) -> tuple[str, str]:
    """(exception type, message) of a FAILURE or REVOKED result as the backend keeps it."""
    if isinstance(result, dict):
        exc_type = str(result.get("exc_type") or "Error")
        args = result.get("exc_message")
        if isinstance(args, (list, tuple)) and exc_type in FIELD_ERRORS and len(args) >= 2:
            message = f"{args[0]}: {args[1]}"
        elif isinstance(args, (list, tuple)):
            message = " ".join(str(a) for a in args)
        else:
            message = str(args or "")
        return exc_type, message
    return "Error", str(result or "")


def install(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(CoreModuleError)
    async def _core_error(request: Request, exc: CoreModuleError) -> JSONResponse:
        retry_after_s = config_of(request).api.retry_after_s
        keyed = "idempotency-key" in request.headers
        return from_core_error(exc, retry_after_s, keyed).response()

    @app.exception_handler(BodyValidationError)
    async def _body_error(request: Request, exc: BodyValidationError) -> JSONResponse:
        return body_error(exc.errors()).response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = getattr(exc, "code", None)
        return APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()


def body_error(errors: Any) -> APIError:
    """FastAPI's own body validation, as OpenAI answers it: 400, naming the field."""
    first = dict(list(errors)[0]) if errors else {"loc": (), "msg": "invalid body"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}", code="bad_json")
    field = ".".join(loc) or "body"
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    named, sep, rest = message.partition(": ")
    if not loc and sep and named.isidentifier():  # a check across fields names its own
        field, message = named, rest
    if first.get("type") == "extra_forbidden":
        message = "unknown parameter: this endpoint does not take it"
    return invalid(field, message)
