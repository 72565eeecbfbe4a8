"""Which Celery task this thread is running, for the code below the handler that must
know it (an engine asking whether the task was revoked) without threading the task
through every call."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

#: (task id, broker level) of the task this thread runs. Celery's pools run each task
#: in a thread of their own, whose context is its own: the value is per task. Threads
#: the task hands work to (the step loop) start from an empty context and see None.
_current: ContextVar[tuple[str, int | None] | None] = ContextVar("omni_current_task", default=None)


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


_running = _Running()


@contextmanager
def running(task_id: str, level: int | None = None) -> Iterator[None]:
    """Make `task_id` (its message delivered at `level`, 0 highest) this
    thread's current task meanwhile."""
    token = _current.set((task_id, level))
    _running.add(task_id)
    try:
        yield
    finally:
        _running.discard(task_id)
        _current.reset(token)


def running_task_ids() -> list[str]:
    """The tasks this process is running now (what the heartbeat says it holds)."""
    return _running.ids()


def current_task_id() -> str | None:
    current = _current.get()
    return None if current is None else current[0]


def current_level() -> int | None:
    """The level the current task's message was delivered at, if known."""
    current = _current.get()
    return None if current is None else current[1]


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
