"""What the step scheduler knows of a request a diffusion worker holds.

`StepTicket` is what the caller says about the request (class, stage, deadline, how to
learn it was cancelled, where its progress goes); `StepRequest` is the scheduler's record
of it, with an ordered `StepStatus` that only the scheduler and its loop change.
`ForwardCall` is one transformer call a request's thread hands to the loop and waits on.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from omni_tasks.errors import RequestCancelledError
from workers.progress import ProgressCallback


class PreviewSink(Protocol):
    """Where a request's previews go: `due` says which ended steps (1-based, of `total`)
    it wants; `publish` gets each of those steps' decoded image. Both run in the request's
    thread and must not raise."""

    def due(self, step: int, total: int) -> bool: ...

    def publish(self, image: Any, step: int, total: int) -> None: ...


class StepStatus(enum.IntEnum):
    """WAITING: held, no step run yet. RUNNING: in the batch. PAUSED: preempted at a step
    boundary, its state kept in its own pipeline call. Then the ways a request ends."""

    WAITING = 0
    RUNNING = 1
    PAUSED = 2
    FINISHED = 3
    FINISHED_EXPIRED = 4
    FINISHED_CANCELLED = 5
    FINISHED_STOPPED = 6
    FINISHED_FAILED = 7
    FINISHED_YIELDED = 8  # handed back to the queue, unstarted, for higher-priority work

    @property
    def finished(self) -> bool:
        return self >= StepStatus.FINISHED


def _never_cancelled() -> bool:
    return False


@dataclass(frozen=True)
class StepTicket:
    """The caller's facts about a request. `deadline` is on `time.monotonic()`;
    `continuing`: a later pipeline stage (the DiT stage of a MULTIMODAL request)."""

    request_id: str
    priority_class: str = "normal"
    continuing: bool = False
    deadline: float = math.inf
    level: int = 0  # its message's level (0 highest): what it yields to
    cancelled: Callable[[], bool] = _never_cancelled
    on_progress: ProgressCallback | None = None
    preview: PreviewSink | None = None


class ForwardCall:
    """One transformer call of one request: the loop resolves or fails it."""

    def __init__(self, payload: Any, first_of_step: bool) -> None:
        self.payload = payload
        # The first call of a denoising step: the request is at a step boundary.
        self.first_of_step = first_of_step
        self._done = threading.Event()
        self._output: Any = None
        self._error: BaseException | None = None

    def resolve(self, output: Any) -> None:
        self._output = output
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, poll_s: float, alive: Callable[[], None]) -> Any:
        """The call's output; `alive()` runs every `poll_s` and may raise to give up."""
        while not self._done.wait(poll_s):
            alive()
        if self._error is not None:
            raise self._error
        return self._output


@dataclass(eq=False)
class StepRequest:
    """A held request. `batch_key`: requests with equal keys may share a step; None means
    the request runs alone (its step cache's state sits on the shared transformer).
    `shape`: what its memory cost is measured and kept under (`workers.resources`)."""

    ticket: StepTicket
    steps: int
    pixels: int
    batch_key: Hashable | None
    shape: Hashable | None = None
    arrival: float = field(default_factory=time.monotonic)
    status: StepStatus = StepStatus.WAITING
    steps_done: int = 0
    preemptions: int = 0
    max_batch: int = 0
    paused_s: float = 0.0
    paused_at: float | None = None
    first_step_at: float | None = None  # wall clock (time.time()) of its first step
    first_step_perf: float | None = None  # the same on time.perf_counter()
    encoded: bool = False  # set by its thread once its prompt is encoded
    pending: ForwardCall | None = None

    @property
    def request_id(self) -> str:
        return self.ticket.request_id

    @property
    def exclusive(self) -> bool:
        return self.batch_key is None

    @property
    def remaining_cost(self) -> float:
        """Megapixel-steps still to run: what shortest-remaining-first ranks by."""
        return max(self.steps - self.steps_done, 0) * self.pixels / 1e6

    def step_ended(self) -> None:
        """Called by the request's own thread when one of its denoising steps ends:
        reports progress, then leaves (RequestCancelledError) if it was revoked."""
        self.steps_done += 1
        if self.ticket.on_progress is not None:
            self.ticket.on_progress({"step": self.steps_done, "steps": self.steps})
        if self.ticket.cancelled():
            raise RequestCancelledError(
                f"{self.request_id}: cancelled after {self.steps_done} denoising steps"
            )
