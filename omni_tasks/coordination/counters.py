"""Per-pool outcome counters and histograms. Successes, their queue wait and run time
(per request type) and the step loop's batch sizes and preemptions are batched: added in
memory, flushed to Redis every 0.25 s in one pipeline. Failures, expirations and
cancellations are counted at once.

A success is the hot path of every task; one Redis round trip per task for a metric
cost more than the whole no-op task itself.
A worker owns one `SuccessCounters` and flushes it on shutdown, so nothing counted is
lost on a clean stop. Pools are named by their queue.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

from omni_tasks.coordination.client import OmniRedis
from omni_tasks.coordination.keyspace import KeySpace
from omni_tasks.coordination.outage import Outage

log = logging.getLogger(__name__)
FLUSH_INTERVAL_S = 0.25
#: Outcomes other than success: a run failed; a request passed its deadline (never
#: started, or stopped running); a request was cancelled before or while it ran; a
#: message came again for a request already done (skipped); a dead worker's message was
#: given back; a lost request was published again (`workers.lifecycle.reaper`).
OUTCOMES = ("failed", "expired", "cancelled", "duplicates", "restored", "recovered")
#: Upper bounds of the queue wait and run time histograms (seconds): a tiny text request
#: takes milliseconds, a large image minutes.
TIME_BUCKETS: tuple[float, ...] = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    *(10.0, 30.0, 60.0, 120.0, 300.0, 600.0, math.inf),
)
#: Upper bounds of the step loop's batch size histogram.
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, math.inf)


def count_outcome(client: OmniRedis, queue: str, outcome: str) -> None:
    """Count one failed, expired or cancelled request of the pool named by `queue`."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; one of {OUTCOMES}")
    client.hincrby(client.keyspace.stats(queue), outcome, 1)


def bucket_label(bound: float) -> str:
    """A bound as Prometheus writes its `le` label: `0.5`, `1.0`, `+Inf`."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def bucket_of(value: float, bounds: Sequence[float]) -> str:
    """The label of the smallest bound that holds `value`."""
    return bucket_label(bounds[min(bisect.bisect_left(bounds, value), len(bounds) - 1)])


def read_histogram(
    raw: Mapping[str, str], name: str, bounds: Sequence[float]
) -> tuple[list[tuple[str, float]], float, int]:
    """(cumulative `(le, count)` buckets, sum, count) of histogram `name` in a hash as
    the flush writes it (one non-cumulative count per bucket)."""
    buckets, total = [], 0
    for bound in bounds:
        label = bucket_label(bound)
        total += int(raw.get(f"{name}:{label}", 0))
        buckets.append((label, float(total)))
    return buckets, float(raw.get(f"{name}:sum", 0.0)), int(raw.get(f"{name}:count", 0))


#: Pending increments per hash: (kind, queue) -> field -> amount; `kind` picks the key
#: function ("timings" or "steps").
_Increments = defaultdict[tuple[str, str], defaultdict[str, float]]


def _increments() -> _Increments:
    return defaultdict(lambda: defaultdict(float))


def _key_of(space: KeySpace, target: tuple[str, str]) -> str:
    kind, queue = target
    return space.timings(queue) if kind == "timings" else space.step_stats(queue)


class SuccessCounters:
    """One process's batched counters; its thread starts on the first figure added.
    `client` gives the Redis client a flush writes with (the worker runtime's)."""

    def __init__(self, client: Callable[[], OmniRedis]) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._pending: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
        self._fields: _Increments = _increments()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._outage = Outage("pool counters", log)

    def add_success(
        self, queue: str, run_s: float, queued_s: float, request_type: str | None = None
    ) -> None:
        """One success of the pool named by `queue`; with `request_type`, its times go
        into that type's histograms too."""
        with self._lock:
            entry = self._pending[queue]
            entry[0] += 1
            entry[1] += run_s
            entry[2] += queued_s
            if request_type is not None:
                fields = self._fields[("timings", queue)]
                for name, value in (("run_s", run_s), ("queued_s", queued_s)):
                    _observe(fields, f"{request_type}:{name}", value, TIME_BUCKETS)
            self._ensure_thread()

    def add_batch(self, queue: str, size: int) -> None:
        """One step of the pool's step loop, run for a batch of `size` requests."""
        with self._lock:
            _observe(self._fields[("steps", queue)], "batch", size, BATCH_BUCKETS)
            self._ensure_thread()

    def add_preemptions(self, queue: str, count: int) -> None:
        """`count` pauses of running requests for higher-ranked ones (0: nothing to do)."""
        if count <= 0:
            return
        with self._lock:
            self._fields[("steps", queue)]["preemptions"] += count
            self._ensure_thread()

    def flush(self) -> None:
        """Send what is pending in one transaction; kept for the next flush while Redis
        is away."""
        with self._lock:
            pending, self._pending = self._pending, defaultdict(lambda: [0, 0.0, 0.0])
            fields, self._fields = self._fields, _increments()
        if not pending and not fields:
            return
        if not self._outage.run(self._write, pending, fields):
            self._restore(pending, fields)

    def _write(self, pending: dict[str, list[float]], fields: _Increments) -> None:
        client = self._client()
        space = client.keyspace
        pipe = client.pipeline(transaction=True)
        for queue, (n, run_s, queued_s) in pending.items():
            pipe.hincrby(space.stats(queue), "processed", int(n))
            pipe.hincrbyfloat(space.stats(queue), "run_s_sum", run_s)
            pipe.hincrbyfloat(space.stats(queue), "queued_s_sum", queued_s)
        for target, increments in fields.items():
            key = _key_of(space, target)
            for field, amount in increments.items():
                if field.endswith(":sum"):
                    pipe.hincrbyfloat(key, field, amount)
                else:
                    pipe.hincrby(key, field, int(amount))
        pipe.execute()

    def _restore(self, pending: dict[str, list[float]], fields: _Increments) -> None:
        with self._lock:
            for queue, values in pending.items():
                entry = self._pending[queue]
                for i, v in enumerate(values):
                    entry[i] += v
            for target, increments in fields.items():
                for field, amount in increments.items():
                    self._fields[target][field] += amount

    def _ensure_thread(self) -> None:
        """Start the flushing thread (lock held)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="omni-counters", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self._outage.pause(FLUSH_INTERVAL_S))
            self.flush()


def _observe(
    fields: defaultdict[str, float], name: str, value: float, bounds: Sequence[float]
) -> None:
    fields[f"{name}:{bucket_of(value, bounds)}"] += 1
    fields[f"{name}:sum"] += value
    fields[f"{name}:count"] += 1
