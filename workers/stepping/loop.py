"""The step loop: one thread that owns the transformer and runs one denoising step at a
time for the batch the step scheduler picks.

Each request runs its own pipeline call in its own (Celery task) thread; its transformer
calls come here as `ForwardCall`s and block until the loop has run them in a batch. So
requests join and leave at step boundaries, keep their own timesteps, guidance and
scheduler, and a paused request simply waits, its latents and scheduler state intact in
its pipeline call, and resumes with no step recomputed. Its message stays unacked all
along: if the worker dies, it is redelivered and starts over.

The loop thread also runs the engine's other device work (`run`: the text encoders, the
VAE decode) between two steps, so only one thread drives the device at a time: on a
CPU, two threads running parallel kernels at once slow each other down more than they
gain, and on a GPU one thread keeps the work on one stream.

Before every batch the loop fails the pending calls of requests past their deadline
(`RequestTimeoutError`), cancelled (`RequestCancelledError`) or of a stopped engine
(`EngineStoppedError`), which frees their slots. A request whose step cache keeps state on
the shared transformer runs alone (`exclusive`): the loop grants it the transformer and
waits until it hands it back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from omni_tasks.errors import (
    EngineStoppedError,
    RequestCancelledError,
    RequestTimeoutError,
    RequestYieldedError,
)
from workers.stepping.request import ForwardCall, StepRequest, StepStatus
from workers.stepping.scheduler import StepScheduler

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Runs one batch: resolves (or fails) every call it is given.
BatchRunner = Callable[[list[ForwardCall]], None]


class StepCounters(Protocol):
    """Where the loop counts its work (the worker's pool counters)."""

    def add_batch(self, size: int) -> None: ...

    def add_preemptions(self, count: int) -> None: ...


class _Uncounted:
    def add_batch(self, size: int) -> None:
        pass

    def add_preemptions(self, count: int) -> None:
        pass


# How a request's end maps to its final status.
_ENDINGS: tuple[tuple[type[BaseException], StepStatus], ...] = (
    (RequestTimeoutError, StepStatus.FINISHED_EXPIRED),
    (RequestCancelledError, StepStatus.FINISHED_CANCELLED),
    (EngineStoppedError, StepStatus.FINISHED_STOPPED),
    (RequestYieldedError, StepStatus.FINISHED_YIELDED),
)
#: How often the idle loop looks at deadlines, cancellation and stop.
POLL_S = 0.02
#: How often a request thread waiting for its call checks that the loop still runs (the
#: loop itself fails calls on deadlines, cancellation and stop): rarely, since a dozen
#: threads waking up often would take the GIL from the loop.
ALIVE_POLL_S = 1.0
#: How long a step waits for running requests still between two calls before it goes
#: without them (they join the next one).
LAGGARD_WAIT_S = 0.1


class StepLoop:
    """Owns the transformer's calls for one engine; `forward` may be called from any thread."""

    def __init__(
        self,
        scheduler: StepScheduler,
        run_batch: BatchRunner,
        limit: int,
        counters: StepCounters | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.counters: StepCounters = counters or _Uncounted()
        self.limit = limit
        self._run_batch = run_batch
        self._cond = threading.Condition()
        self._stopped = False
        self._granted: StepRequest | None = None
        self._steps = 0  # batches run: what the arrival watch paces itself by
        self._jobs: list[ForwardCall] = []
        self._unshared_jobs: list[ForwardCall] = []  # held while a request runs alone
        self._thread = threading.Thread(target=self._serve, name="step-loop", daemon=True)
        self._thread.start()

    # --- what request threads call ------------------------------------------------------------

    def admit(self, request: StepRequest) -> None:
        with self._cond:
            self._check_stopped(request)
            self.scheduler.add(request)

    def leave(self, request: StepRequest, status: StepStatus) -> None:
        """The request is done with the transformer (finished, failed or gave up)."""
        with self._cond:
            if not request.status.finished:
                self.scheduler.finish(request, status)
            if self._granted is request:
                self._granted = None
            self._cond.notify_all()
        self.counters.add_preemptions(request.preemptions)

    @contextmanager
    def holding(self, request: StepRequest | None) -> Iterator[None]:
        """Hold `request` in the scheduler meanwhile (None: nothing to hold); how the
        block ends (done, or which error) sets its final status."""
        if request is None:
            yield
            return
        self.admit(request)
        status = StepStatus.FINISHED_FAILED
        try:
            yield
            status = StepStatus.FINISHED
        except BaseException as exc:
            status = next((s for kind, s in _ENDINGS if isinstance(exc, kind)), status)
            raise
        finally:
            self.leave(request, status)

    def forward(self, request: StepRequest, payload: Any, first_of_step: bool) -> Any:
        """Hand one transformer call to the loop; its output once a batch has run it."""
        call = ForwardCall(payload, first_of_step)
        with self._cond:
            self._check_stopped(request)
            request.pending = call
            self._cond.notify_all()
        return call.wait(ALIVE_POLL_S, self._check_alive)

    def run(self, fn: Callable[[], T], *, unshared: bool = False) -> T:
        """Run `fn` on the loop thread before the next step; its result (or exception).
        `unshared`: only while no request holds the transformer alone (`exclusive`),
        for work that changes the transformer (loading a LoRA adapter)."""
        if threading.current_thread() is self._thread:
            return fn()
        job = ForwardCall(fn, first_of_step=False)
        with self._cond:
            if self._stopped:
                raise EngineStoppedError("diffusion engine shut down")
            (self._unshared_jobs if unshared else self._jobs).append(job)
            self._cond.notify_all()
        return job.wait(ALIVE_POLL_S, self._check_alive)

    @contextmanager
    def exclusive(self, request: StepRequest) -> Iterator[None]:
        """Hold the transformer alone meanwhile (when the scheduler picks `request`)."""
        self.forward(request, None, first_of_step=True)
        try:
            yield
        finally:
            with self._cond:
                if self._granted is request:
                    self._granted = None
                self._cond.notify_all()

    def worst_unstarted_level(self) -> int | None:
        """The worst (highest) level among held requests that have not
        run a step and could be handed back now (None: none of them)."""
        with self._cond:
            levels = [r.ticket.level for r in self._unstarted()]
        return max(levels) if levels else None

    def yield_unstarted(self, level: int) -> bool:
        """Hand back the unstarted held request of the worst level if that is worse than
        `level`: its call fails with RequestYieldedError and its task requeues it."""
        with self._cond:
            unstarted = self._unstarted()
            if not unstarted:
                return False
            worst = max(unstarted, key=lambda r: (r.ticket.level, r.arrival))
            if level >= worst.ticket.level or worst.pending is None:
                return False
            call = worst.pending
            self.scheduler.finish(worst, StepStatus.FINISHED_YIELDED)
            call.fail(RequestYieldedError(f"{worst.request_id}: yields to level {level}"))
            self._cond.notify_all()
            return True

    def wait_for_step(self, seen: int, timeout_s: float) -> int:
        """Wait until a batch has run since `seen` batches (or `timeout_s`, or a stop);
        how many have run."""
        with self._cond:
            self._cond.wait_for(lambda: self._steps != seen or self._stopped, timeout_s)
            return self._steps

    def would_preempt(self, request: StepRequest) -> bool:
        """Whether `request` outranks a running request of a full batch: it will take
        that one's slot as soon as it is ready, so its preparation is urgent."""
        with self._cond:
            running = [r for r in self.scheduler.held() if r.status is StepStatus.RUNNING]
            if len(running) < self.limit or not self.scheduler.preemption:
                return False
            rank = self.scheduler.rank(request)
            return any(self.scheduler.rank(r) > rank for r in running)

    def stop(self) -> None:
        """Fail every waiting call with EngineStoppedError; later calls raise it too."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # --- the loop -----------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            jobs, batch = self._next_work()
            for job in jobs:
                _run_job(job)
            if batch is None:
                if not jobs:
                    return
                continue
            calls = [r.pending for r in batch]
            for r in batch:
                r.pending = None
            if batch[0].exclusive:
                self._grant(batch[0], calls[0])
                continue
            self.counters.add_batch(len(batch))
            try:
                self._run_batch([c for c in calls if c is not None])
            except BaseException as exc:  # the runner fails its calls; never kill the loop
                log.exception("a batch of %d failed", len(batch))
                for call in calls:
                    if call is not None and not call.done:
                        call.fail(exc)
            with self._cond:
                self._steps += 1
                self._cond.notify_all()

    def _next_work(self) -> tuple[list[ForwardCall], list[StepRequest] | None]:
        """Wait for jobs to run, or for a batch that can (neither once stopped)."""
        since = time.monotonic()
        with self._cond:
            while True:
                self._drop_finished_calls()
                jobs, self._jobs = self._jobs, []
                if self._granted is None or self._stopped:
                    jobs, self._unshared_jobs = jobs + self._unshared_jobs, []
                if self._stopped:
                    for job in jobs:
                        job.fail(EngineStoppedError("diffusion engine shut down"))
                    return [], None
                if jobs:
                    return jobs, None
                if self._granted is None and not self._laggards(since):
                    batch = self.scheduler.get_next_batch(self.limit)
                    if batch:
                        return [], batch
                self._cond.wait(POLL_S)

    def _grant(self, request: StepRequest, call: ForwardCall | None) -> None:
        with self._cond:
            self._granted = request
        if call is not None:
            call.resolve(None)

    def _laggards(self, since: float) -> bool:
        """Running requests still between two calls, waited for up to LAGGARD_WAIT_S; a
        request that reserved a slot counts once its prompt is encoded (its first call is
        milliseconds away), not while it encodes (the others step on meanwhile)."""
        if time.monotonic() - since > LAGGARD_WAIT_S:
            return False
        return any(
            r.status is StepStatus.RUNNING
            and r.pending is None
            and (r.first_step_at is not None or r.encoded)
            for r in self.scheduler.held()
        )

    def _unstarted(self) -> list[StepRequest]:
        """Held requests waiting for their first step, ready to run (lock held)."""
        return [
            r
            for r in self.scheduler.held()
            if r.first_step_at is None and r.pending is not None and not r.status.finished
        ]

    def _drop_finished_calls(self) -> None:
        """Fail the waiting calls of stopped, expired or cancelled requests (lock held)."""
        now = time.monotonic()
        for r in self.scheduler.held():
            call = r.pending
            if call is None:
                continue
            error, status = self._verdict(r, now)
            if error is not None:
                self.scheduler.finish(r, status)
                call.fail(error)
                self._cond.notify_all()

    def _verdict(self, r: StepRequest, now: float) -> tuple[Exception | None, StepStatus]:
        rid = r.request_id
        if self._stopped:
            return EngineStoppedError(
                f"{rid}: diffusion engine shut down"
            ), StepStatus.FINISHED_STOPPED
        if now > r.ticket.deadline:
            error = RequestTimeoutError(f"{rid}: timed out after {r.steps_done} denoising steps")
            return error, StepStatus.FINISHED_EXPIRED
        if r.ticket.cancelled():
            error = RequestCancelledError(f"{rid}: cancelled after {r.steps_done} denoising steps")
            return error, StepStatus.FINISHED_CANCELLED
        return None, StepStatus.WAITING

    def _check_stopped(self, request: StepRequest) -> None:
        if self._stopped:
            raise EngineStoppedError(f"{request.request_id}: diffusion engine shut down")

    def _check_alive(self) -> None:
        if not self._thread.is_alive():
            raise EngineStoppedError("the diffusion step loop has stopped")


def _run_job(job: ForwardCall) -> None:
    try:
        job.resolve(job.payload())
    except BaseException as exc:  # handed to the caller; the loop goes on
        job.fail(exc)
