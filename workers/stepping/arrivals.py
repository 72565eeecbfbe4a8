"""The lookahead's eye on the queue: hand an unstarted request back for a better message.

A diffusion worker's held slots are all taken while lower-class work is queued, so it
would see a higher-class arrival only once one of its requests ends. A watcher thread
reads the worker's queues every `interval_s` (one round trip, and only while the worker
holds requests that have not started); when a message of higher priority than the
lowest such request waits there, that request is handed back (its message requeued,
nothing computed), which frees a slot, and the broker gives the worker the better
message.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from omni_tasks.coordination.outage import Outage
from workers.stepping.loop import StepLoop

log = logging.getLogger(__name__)

#: How often the watcher reads the queue.
PEEK_S = 0.02


class ArrivalWatch:
    """A daemon thread over one step loop; `waiting_level` reads the queues (0 highest,
    None when empty)."""

    def __init__(
        self, loop: StepLoop, waiting_level: Callable[[], int | None], interval_s: float = PEEK_S
    ) -> None:
        self._loop = loop
        self._waiting_level = waiting_level
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-arrivals", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        outage = Outage("queue watch", log)
        while not self._stopped.wait(outage.pause(self._interval_s)):
            worst = self._loop.worst_unstarted_level()
            if worst:  # something held that a waiting message could outrank
                outage.run(self._peek, worst)

    def _peek(self, worst: int) -> None:
        level = self._waiting_level()
        if level is not None and level < worst:
            self._loop.yield_unstarted(level)
