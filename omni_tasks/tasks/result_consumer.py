"""Celery's Redis result consumer (the pub/sub connection an `AsyncResult.get()` waits
on), made to outlast any Redis outage: a restart, a failover, a network cut.

Celery's consumer reconnects on a lost connection with the backend's retry policy
(20 tries about a second apart). When Redis is away longer, or a Sentinel failover takes
its time, the waiting caller gets `RuntimeError("Retry limit exceeded while trying to
reconnect to the Celery redis result store backend. The Celery application must be
restarted.")`, and so does every later `.get()` of the process, though its results are
(or will be) in Redis.

Here a reconnect that fails after a few quick tries leaves the consumer marked "due":
each later wait tries again (a wait with a timeout still times out on time), a result
subscribed meanwhile is only recorded, and the reconnect that succeeds subscribes to
every pending result and reads the ones stored while Redis was away (Celery's
`_reconnect_pubsub` does both). A Sentinel URL's connections ask the Sentinels for the
master again, so a reconnect after a failover lands on the new one.
"""

from __future__ import annotations

import logging
import time
from types import MappingProxyType

from celery.backends.redis import ResultConsumer

from omni_tasks.coordination.outage import describe

log = logging.getLogger(__name__)

#: One reconnect: a few tries, about a second in all, before the wait is given back to
#: its caller (who waits again, or times out).
RECONNECT_POLICY = MappingProxyType(
    {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.3, "interval_max": 0.5}
)
#: The pause of a wait whose reconnect failed (a wait without a timeout, or a longer one).
DUE_PAUSE_S = 0.5


class ResilientResultConsumer(ResultConsumer):
    """Celery's Redis `ResultConsumer`, which never gives up reconnecting."""

    _reconnect_due = False

    def _reconnect(self) -> None:
        """Celery's reconnect, with a short retry budget; when Redis is still away the
        next wait tries again, instead of raising "Retry limit exceeded"."""
        try:
            self._ensure(self._reconnect_pubsub, (), **RECONNECT_POLICY)
        except self._connection_errors as exc:
            if not self._reconnect_due:
                log.warning(
                    "result store unreachable (%s); reconnecting on each wait", describe(exc)
                )
            self._reconnect_due = True
            return
        if self._reconnect_due:
            log.warning(
                "result store reconnected; %d result(s) subscribed", len(self.subscribed_to)
            )
        self._reconnect_due = False

    def drain_events(self, timeout: float | None = None) -> None:
        """Celery's wait for a result message; while a reconnect is due, one reconnect
        try instead (then a short pause if Redis is still away)."""
        if self._reconnect_due:
            with self._locked():
                if self._reconnect_due:
                    self._reconnect()
            if self._reconnect_due:
                time.sleep(DUE_PAUSE_S if timeout is None else min(timeout, DUE_PAUSE_S))
                return
        super().drain_events(timeout)

    def consume_from(self, task_id: str) -> None:
        """Celery's; while a reconnect is due the result is only recorded: the
        reconnect subscribes to it and reads it if it is stored already."""
        with self._locked():
            if self._reconnect_due:
                key = self._get_key_for_task(task_id)
                self._pending_unsubscribe.discard(key)
                self.subscribed_to.add(key)
                return
        super().consume_from(task_id)
