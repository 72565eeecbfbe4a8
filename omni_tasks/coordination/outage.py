"""How a background loop that talks to Redis behaves while Redis is away.

A worker runs several threads that poll or write Redis on their own pace: the heartbeat,
the reaper, the counter and release flushes, the step loop's queue watcher, progress
writes, the DiT cache directory. When Redis stops (a restart, a failover, a network cut)
every call of every one of them fails. Logging each failure with its traceback buried a
three-second restart under twelve thousand lines, and retrying at full pace kept the
threads spinning against a closed port.

`Outage` is one component's memory of the current outage. The first failure logs one
line; the component backs off (`pause`: a growing delay, capped), and logs one more line
each time a backoff step ends with Redis still away; the first success afterwards logs
one "reconnected" line. Steps end at `MAX_BACKOFF_S`, so every loop notices Redis's
return within seconds, however long it was away. A failure that is not a lost
connection (a bug, a bad reply) logs its traceback once, on the first line of the
outage it starts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from kombu.exceptions import OperationalError

#: What "Redis is unreachable" looks like: refused or reset connections, timeouts, a
#: server still loading its AOF (`BusyLoadingError` is a `ConnectionError`), and kombu's
#: wrapping of the same.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
    OperationalError,
)
#: The first backoff step; each next one doubles, up to `max_s`.
FIRST_BACKOFF_S = 0.5
#: The longest step: a loop notices Redis's return within this.
MAX_BACKOFF_S = 10.0


def describe(exc: BaseException) -> str:
    """`Type: message` on one line (redis-py's messages may span several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Outage:
    """One component's view of Redis being away; thread-safe, and free while Redis
    answers (`recovered` is a flag test then)."""

    def __init__(
        self,
        component: str,
        logger: logging.Logger,
        *,
        first_s: float = FIRST_BACKOFF_S,
        max_s: float = MAX_BACKOFF_S,
    ) -> None:
        self.component = component
        self._log = logger
        self._first_s = min(first_s, max_s)
        self._max_s = max_s
        self._lock = threading.Lock()
        self._down = False
        self._since = 0.0
        self._failures = 0
        self._delay_s = 0.0
        self._next_line_at = 0.0
        self._lost_connection = False

    @property
    def down(self) -> bool:
        """Whether the last attempt failed."""
        return self._down

    @property
    def delay_s(self) -> float:
        """The current backoff step (0 while Redis answers)."""
        return self._delay_s if self._down else 0.0

    def pause(self, interval_s: float) -> float:
        """What a loop waits before its next attempt: its own interval while Redis
        answers, the backoff step while it is away (shorter than a long interval at
        first, so the loop notices Redis's return soon)."""
        return self._delay_s if self._down else interval_s

    def failed(self, exc: BaseException) -> float:
        """Record a failed attempt; log a line if it starts the outage or ends a backoff
        step. Returns the backoff step to wait."""
        now = time.monotonic()
        with self._lock:
            self._failures += 1
            if not self._down:
                self._down, self._since, self._failures = True, now, 1
                self._delay_s = self._first_s
                self._next_line_at = now + self._delay_s
                self._first_line(exc)
                return self._delay_s
            if now >= self._next_line_at:
                self._delay_s = min(self._delay_s * 2, self._max_s)
                self._next_line_at = now + self._delay_s
                self._log.warning(
                    "%s: %s after %.1f s, %d failed attempts (%s); next try in %.1f s",
                    self.component,
                    "Redis still unreachable" if _lost(exc) else "still failing",
                    now - self._since,
                    self._failures,
                    describe(exc),
                    self._delay_s,
                )
            return self._delay_s

    def recovered(self) -> None:
        """Record a successful attempt; log one line if it ends an outage."""
        if not self._down:
            return
        with self._lock:
            if not self._down:
                return
            self._down = False
            self._log.warning(
                "%s: reconnected to Redis after %.1f s (%d failed attempts)"
                if self._lost_connection
                else "%s: working again after %.1f s (%d failed attempts)",
                self.component,
                time.monotonic() - self._since,
                self._failures,
            )
            self._failures = 0
            self._delay_s = 0.0

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Call `fn`; whatever it raises is recorded here (never raised). Returns whether
        it succeeded."""
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the outage is the report
            self.failed(exc)
            return False
        self.recovered()
        return True

    def _first_line(self, exc: BaseException) -> None:
        self._lost_connection = _lost(exc)
        if self._lost_connection:
            self._log.warning(
                "%s: Redis unreachable (%s); retrying with backoff from %.1f s up to %.0f s",
                self.component,
                describe(exc),
                self._first_s,
                self._max_s,
            )
        else:
            self._log.warning(
                "%s failed (%s); retrying with backoff",
                self.component,
                describe(exc),
                exc_info=exc,
            )


def _lost(exc: BaseException) -> bool:
    return isinstance(exc, CONNECTION_ERRORS)
