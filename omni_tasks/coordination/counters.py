"""Per-pool outcome counters. Successes are batched: added in memory, flushed to Redis
every 0.25 s. Failures, expirations and cancellations are counted at once.

A success is the hot path of every task; one Redis round trip per task for a metric
cost more than the whole no-op task itself.
A worker owns one `SuccessCounters` and flushes it on shutdown, so nothing counted is
lost on a clean stop. Pools are named by their queue.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

from omni_tasks.coordination import keys
from omni_tasks.coordination.client import get_redis

log = logging.getLogger(__name__)
FLUSH_INTERVAL_S = 0.25
#: Outcomes other than success: a run failed; a request passed its deadline (never
#: started, or stopped running); a request was cancelled before or while it ran; a
#: message came again for a request already done (skipped); a dead worker's message was
#: given back; a lost request was published again (`workers.lifecycle.reaper`).
OUTCOMES = ("failed", "expired", "cancelled", "duplicates", "restored", "recovered")


def count_outcome(queue: str, outcome: str) -> None:
    """Count one failed, expired or cancelled request of the pool named by `queue`."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; one of {OUTCOMES}")
    get_redis().hincrby(keys.stats(queue), outcome, 1)


class SuccessCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def add_success(self, queue: str, run_s: float, queued_s: float) -> None:
        with self._lock:
            entry = self._pending[queue]
            entry[0] += 1
            entry[1] += run_s
            entry[2] += queued_s
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="omni-counters", daemon=True
                )
                self._thread.start()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, defaultdict(lambda: [0, 0.0, 0.0])
        if not pending:
            return
        try:
            pipe = get_redis().pipeline(transaction=True)
            for queue, (n, run_s, queued_s) in pending.items():
                pipe.hincrby(keys.stats(queue), "processed", int(n))
                pipe.hincrbyfloat(keys.stats(queue), "run_s_sum", run_s)
                pipe.hincrbyfloat(keys.stats(queue), "queued_s_sum", queued_s)
            pipe.execute()
        except Exception:
            log.warning("could not flush pool counters; keeping them", exc_info=True)
            with self._lock:
                for queue, values in pending.items():
                    entry = self._pending[queue]
                    for i, v in enumerate(values):
                        entry[i] += v

    def _loop(self) -> None:
        while True:
            self._wake.wait(FLUSH_INTERVAL_S)
            self.flush()
