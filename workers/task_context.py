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


class _Running:
    """The ids of the tasks this process's threads are running now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}

    def add(self, task_id: str) -> None:
        with self._lock:
            self._ids[task_id] = self._ids.get(task_id, 0) + 1

    def discard(self, task_id: str) -> None:
        with self._lock:
            left = self._ids.pop(task_id, 1) - 1
            if left > 0:
                self._ids[task_id] = left

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._ids)


_current = _Current()
_running = _Running()


@contextmanager
def running(task_id: str, priority: int | None = None) -> Iterator[None]:
    """Make `task_id` (its message delivered at broker `priority`, 0 highest) this
    thread's current task meanwhile."""
    outer = _current.task_id, _current.priority
    _current.task_id, _current.priority = task_id, priority
    _running.add(task_id)
    try:
        yield
    finally:
        _running.discard(task_id)
        _current.task_id, _current.priority = outer


def running_task_ids() -> list[str]:
    """The tasks this process is running now (what the heartbeat says it holds)."""
    return _running.ids()


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
