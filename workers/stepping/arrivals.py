"""The lookahead's eye on the queue: hand an unstarted request back for a better message.

A diffusion worker's held slots are all taken while lower-class work is queued, so it
would see a higher-class arrival only once one of its requests ends. While the worker
holds requests that have not started, a watcher thread asks Redis, once per denoising
step and in the middle of it (so that what it finds is fetched and encoded before the
step ends), whether a message of a better level than the worst such request waits in the
worker's queues: one `EXISTS` over the lists of the better levels (kombu deletes a list
when it empties), so one command per step, whatever the depth. When one waits, that
request is handed back (its message requeued, nothing computed), which frees a slot,
and the broker gives the worker the better message. With no step running, it asks once
per `IDLE_PEEK_S`; never more often than every `MIN_PEEK_S`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from omni_tasks.coordination.outage import Outage
from workers.stepping.loop import StepLoop

log = logging.getLogger(__name__)

#: The shortest gap between two reads of the queue (steps faster than this share one).
MIN_PEEK_S = 0.02
#: How often the watcher reads the queue while no step runs.
IDLE_PEEK_S = 1.0


class ArrivalWatch:
    """A daemon thread over one step loop; `waiting_above(level)` says whether a message
    of a better level (0 highest) than `level` waits in the worker's queues."""

    def __init__(self, loop: StepLoop, waiting_above: Callable[[int], bool]) -> None:
        self._loop = loop
        self._waiting_above = waiting_above
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-arrivals", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        outage = Outage("queue watch", log)
        seen, boundary = 0, time.monotonic()
        while not self._stopped.is_set():
            steps = self._loop.wait_for_step(seen, IDLE_PEEK_S)
            if steps != seen:
                now = time.monotonic()
                step_s, boundary, seen = now - boundary, now, steps
                # Read in the middle of the next step: a message found then is fetched
                # and encoded before that step ends, and joins at its boundary.
                if self._stopped.wait(step_s / 2 if step_s < IDLE_PEEK_S else 0.0):
                    return
            worst = self._loop.worst_unstarted_level()
            if worst:  # something held that a waiting message could outrank
                outage.run(self._peek, worst)
            self._stopped.wait(outage.pause(MIN_PEEK_S))

    def _peek(self, worst: int) -> None:
        if self._waiting_above(worst):
            self._loop.yield_unstarted(worst - 1)
