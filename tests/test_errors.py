"""The error hierarchy: every error is a `CoreModuleError`; the validation errors are
`ValueError`s that name the field."""

from __future__ import annotations

import pytest

import omni_tasks
from omni_tasks.errors import (
    ConfigError,
    CoreModuleError,
    EngineStoppedError,
    ProcessingError,
    QueueFullError,
    RequestTimeoutError,
    RequestValidationError,
    SchedulerError,
)


@pytest.mark.parametrize(
    "name",
    [
        "SchedulerError",
        "QueueFullError",
        "CacheError",
        "ResourceError",
        "ProcessingError",
        "RequestTimeoutError",
        "RequestCancelledError",
        "EngineStoppedError",
        "ConfigError",
        "RequestValidationError",
    ],
)
def test_every_error_is_a_core_module_error(name: str) -> None:
    assert issubclass(getattr(omni_tasks, name), CoreModuleError)


def test_the_narrower_errors_are_caught_by_their_family() -> None:
    assert issubclass(QueueFullError, SchedulerError)
    assert issubclass(RequestTimeoutError, ProcessingError)
    assert issubclass(EngineStoppedError, ProcessingError)
    with pytest.raises(SchedulerError):
        raise QueueFullError("full")


def test_config_error_is_a_value_error_with_the_field() -> None:
    error = ConfigError("ar.queue", "must not be empty")
    assert isinstance(error, ValueError)
    assert (error.field, str(error)) == ("ar.queue", "ar.queue: must not be empty")


def test_request_validation_error_names_the_first_field_and_keeps_all() -> None:
    error = RequestValidationError("width", "must be a multiple of 16")
    assert isinstance(error, ValueError)
    assert (error.field, str(error)) == ("width", "width: must be a multiple of 16")
    assert error.errors == [{"field": "width", "message": "must be a multiple of 16"}]
    both = [
        {"field": "width", "message": "too small"},
        {"field": "steps", "message": "too many"},
    ]
    assert RequestValidationError("width", "too small", both).errors == both
