"""Progress of a running request: Celery state `PROGRESS` with `info` the engine's figures.

Images report `{"step": k, "steps": N}`, text `{"tokens": n, "max_tokens": N}`. The state
goes to the result backend (`AsyncResult.state` / `.info`, `omni-tasks submit --wait`) and a
`task-progress` event goes to Flower. Engines call the plain callback `Reporter.report`
from whatever thread steps them; the reporter throttles it to `interval_s` per request
(the first and the last figures always pass) so a fast engine costs the backend a few
writes a second, not one per step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

PROGRESS = "PROGRESS"
#: Seconds between two progress writes of one request.
DEFAULT_INTERVAL_S = 0.25
#: What an engine calls with its figures; engines accept None for "nobody listens".
ProgressCallback = Callable[[Mapping[str, int]], None]


class Reporter:
    """Writes one task's progress; safe to call from any thread."""

    def __init__(self, task: Any, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self._task = task
        self._task_id: str = task.request.id or ""
        self._interval_s = interval_s
        self._last = float("-inf")
        self._lock = threading.Lock()
        self.writes = 0

    def report(self, info: Mapping[str, int]) -> None:
        """Record `info` unless the last write was under `interval_s` ago (the final
        figure, where the count reaches its total, is always written)."""
        now = time.monotonic()
        final = _is_final(info)
        with self._lock:
            if not final and now - self._last < self._interval_s:
                return
            self._last = now
            self.writes += 1
        meta = dict(info)
        try:
            self._task.update_state(task_id=self._task_id, state=PROGRESS, meta=meta)
            self._task.send_event("task-progress", **meta)
        except Exception:  # progress is advisory: never fail the request over it
            log.warning("%s: could not record progress", self._task_id, exc_info=True)


def _is_final(info: Mapping[str, int]) -> bool:
    for done, total in (("step", "steps"), ("tokens", "max_tokens")):
        if done in info and total in info:
            return info[done] >= info[total]
    return False


class _Current(threading.local):
    reporter: Reporter | None = None


_current = _Current()


@contextmanager
def reporting(task: Any, interval_s: float = DEFAULT_INTERVAL_S) -> Iterator[Reporter]:
    """Make a reporter for `task` the current one of this (the task's) thread meanwhile."""
    outer = _current.reporter
    reporter = Reporter(task, interval_s)
    _current.reporter = reporter
    try:
        yield reporter
    finally:
        _current.reporter = outer


def callback() -> ProgressCallback | None:
    """The current task's `report`, for an engine call made from the task's thread."""
    reporter = _current.reporter
    return None if reporter is None else reporter.report
