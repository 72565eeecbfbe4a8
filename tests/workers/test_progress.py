"""Progress of running requests (`workers.progress`): the reporter on the real result
backend of the tests (throttling, no write after the run, a failing backend), then a
real AR worker: a long text request shows `PROGRESS` with its token count through
`AsyncResult`, and `omni-tasks submit` draws the bar while it waits."""

from __future__ import annotations

import time
import uuid

from celery import Celery
from celery.result import AsyncResult
from helpers import eventually

import omni_tasks
from workers import progress
from workers.progress import PROGRESS, Reporter


class RunningTask:
    """A real task of the app with the request context Celery gives a running task."""

    def __init__(self, app: Celery = omni_tasks.app) -> None:
        self.task = app.tasks["omni_tasks.generate_text"]
        self.id = uuid.uuid4().hex

    def __enter__(self) -> RunningTask:
        self.task.push_request(id=self.id, hostname="progress-test@host")
        return self

    def __exit__(self, *exc: object) -> None:
        self.task.pop_request()


def feed(reporter: Reporter, seconds: float, total: int = 1000) -> int:
    """Report a rising token count as fast as an engine could, for `seconds`."""
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
        reporter.report({"tokens": min(n, total), "max_tokens": total})
    return n


def warm_writer() -> None:
    """One write first, so the writer thread's connections (result store, events) are
    open: on a busy 2-core machine, opening them can take most of a second."""
    with RunningTask() as running:
        with progress.reporting(running.task, interval_s=0.01, first_after_s=0) as reporter:
            reporter.report({"tokens": 1, "max_tokens": 2})
            assert eventually(lambda: reporter.writes == 1, timeout_s=10)


def test_reports_are_throttled_to_a_few_writes_and_stop_at_the_end(redis_client) -> None:
    warm_writer()
    with RunningTask() as running:
        with progress.reporting(running.task, interval_s=0.2, first_after_s=0.3) as reporter:
            assert progress.callback() == reporter.report
            calls = feed(reporter, 1.3)
        after_close = reporter.writes
        reporter.report({"tokens": 999, "max_tokens": 1000})  # the run is over: ignored
    time.sleep(0.3)  # time for a late write, which must not come
    assert calls > 1000
    # Writes at ~0.3, 0.5, ... 1.3 s: at most one per interval once the first is due.
    assert 3 <= after_close <= 6, after_close
    assert reporter.writes == after_close
    result = AsyncResult(running.id, app=omni_tasks.app)
    assert result.state == PROGRESS
    assert result.info["max_tokens"] == 1000 and 0 < result.info["tokens"] <= 1000
    assert progress.callback() is None  # outside a run nobody listens


def test_a_run_shorter_than_the_first_delay_writes_nothing(redis_client) -> None:
    with RunningTask() as running:
        with progress.reporting(running.task, first_after_s=1.0) as reporter:
            feed(reporter, 0.3)
    time.sleep(0.2)  # time for a late write, which must not come
    assert reporter.writes == 0
    assert AsyncResult(running.id, app=omni_tasks.app).state == "PENDING"


def test_an_unreachable_backend_never_reaches_the_engine() -> None:
    app = Celery("progress-unreachable", backend="redis://127.0.0.1:1/0", set_as_current=False)

    @app.task(name="unreachable-progress", bind=True)
    def unreachable(self) -> None:  # pragma: no cover - never run, only reported on
        return None

    task = app.tasks["unreachable-progress"]
    task.push_request(id=uuid.uuid4().hex)
    try:
        with progress.reporting(task, interval_s=0.05, first_after_s=0.0) as reporter:
            feed(reporter, 0.3)  # raises nothing, blocks on nothing
            time.sleep(0.5)  # the run goes on while the backend is unreachable
    finally:
        task.pop_request()
    assert reporter.writes == 0


# ------------------------------------------------------------- on a real worker
