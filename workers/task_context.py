"""Which Celery task this thread is running, for the code below the handler that must
know it (an engine asking whether the task was revoked) without threading the task
through every call."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class _Current(threading.local):
    task_id: str | None = None
    priority: int | None = None


_current = _Current()


@contextmanager
def running(task_id: str, priority: int | None = None) -> Iterator[None]:
    """Make `task_id` (its message delivered at broker `priority`, 0 highest) this
    thread's current task meanwhile."""
    outer = _current.task_id, _current.priority
    _current.task_id, _current.priority = task_id, priority
    try:
        yield
    finally:
        _current.task_id, _current.priority = outer


def current_task_id() -> str | None:
    return _current.task_id


def current_priority() -> int | None:
    """The broker priority the current task's message was delivered at, if known."""
    return _current.priority


def is_revoked(task_id: str) -> bool:
    """Whether this worker has been told to revoke `task_id` (`app.control.revoke`)."""
    from celery.worker import state

    return task_id in state.revoked


def revoked_check() -> Callable[[], bool]:
    """A cheap check the step loop calls every step: is the current task revoked?"""
    task_id = current_task_id()
    if task_id is None:
        return lambda: False
    return lambda: is_revoked(task_id)
