"""Celery's Redis result backend as omni-tasks runs it: a caller subscribes to a result
when it waits (`SubscribeOnWait`), and a task stores each state in one round trip
(`StoreInOneTrip`). `OmniCelery._get_backend` builds it (`omni_result_backend`)."""

from __future__ import annotations

import functools
from typing import Any

from celery import states
from celery.backends.base import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from omni_tasks.coordination.lua import SOURCES
from omni_tasks.tasks.result_consumer import ResilientResultConsumer


class SubscribeOnWait:
    """Celery's Redis result backend, whose result consumer outlasts any Redis outage
    (`ResilientResultConsumer`), and whose first subscription waits for a caller that
    waits. Celery subscribes to each result as its task is sent (`on_task_call`); the
    first one opens the process's subscriber connection, retrying for minutes when
    Redis is away, before the send's accepting step could refuse at once. Until a
    caller has waited (`add_pending_result`, which subscribes, after which Celery reads
    the stored result: nothing is missed), sends subscribe to nothing; once the
    connection is open, they subscribe as Celery does, so a result that comes before
    the caller waits is already on its way."""

    ResultConsumer = ResilientResultConsumer

    def on_task_call(self, producer: Any, task_id: str) -> None:
        if getattr(self.result_consumer, "_pubsub", None) is not None:
            super().on_task_call(producer, task_id)  # type: ignore[misc]


def encoded_state(
    backend: Any, task_id: str, result: Any, state: str, request: Any, traceback: Any = None
) -> Any:
    """A task's state as Celery's Redis result backend stores it (the JSON of its meta),
    for a write of omni-tasks' own: this backend's, the run claim's STARTED, a worker's
    batch of PROGRESS states."""
    meta = backend._get_result_meta(result, state, traceback, request)
    meta["task_id"] = bytes_to_str(task_id)
    return backend.encode(meta)


class StoreInOneTrip:
    """Each state a task stores (STARTED aside, which the run claim stores: PROGRESS,
    SUCCESS, FAILURE, REVOKED) costs one round trip, `store_result.lua`, where Celery's
    own costs two: a GET, to never replace a stored success, then the write and its
    publish. The rule, the time to live (failures' own), the size cap and the retries
    on a lost connection are Celery's."""

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        backend: Any = self
        value = encoded_state(backend, task_id, result, state, request, traceback)
        if isinstance(value, str) and len(value) > backend._MAX_STR_VALUE_SIZE:
            too_large = "value too large for Redis backend"
            raise BackendStoreError(too_large, state=state, task_id=task_id)
        expires = backend.failure_expires if state == states.FAILURE else backend.expires
        key = backend.get_key_for_task(task_id)
        backend.ensure(self._store_script, ([key], [value, int(expires or 0)]))
        return result

    @functools.cached_property
    def _store_script(self) -> Any:
        return self.client.register_script(SOURCES["store_result"])  # type: ignore[attr-defined]


@functools.cache
def omni_result_backend(backend: type) -> type:
    """`backend` (a Redis result backend class) with `SubscribeOnWait` and
    `StoreInOneTrip`."""
    return type(f"Omni{backend.__name__}", (SubscribeOnWait, StoreInOneTrip, backend), {})
