"""The worker's message consumer: refuses malformed task messages before they reach a pool.

Celery defers decoding to the pool, and drops some malformed messages with only a log
line (no headers, kwargs that are not an object), leaving their task PENDING forever.
Checking each message on arrival (content type, protocol-2 headers, body shape) rejects
it at once, records it, marks its task failed (so a caller waiting on it learns why)
and keeps the worker serving. Entries too broken for kombu to build a message from
are caught one step earlier, by the transport this consumer reads with
(`workers.transport`). A well-formed message from a client that does not import
omni_tasks is published again where `.delay()` would have put it, and a message for a
model this worker does not serve is passed on to that model's queue
(`workers.lifecycle.reroute`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.worker.consumer import Consumer
from kombu.serialization import prepare_accept_content, registry

from omni_tasks.coordination.outage import Outage
from omni_tasks.coordination.rejections import record_rejection
from omni_tasks.errors import RequestConflictError, RequestValidationError
from workers.lifecycle.reroute import reroute, reroute_reason
from workers.runtime import runtime
from workers.transport import consuming_transport, fail_task

log = logging.getLogger(__name__)
#: The longest wait between two tries to reach a lost broker again.
RECONNECT_MAX_S = 2.0
#: How long a buffered task event waits for others to be published with it.
EVENT_BATCH_S = 0.01
#: A batch still pending after this long has lost its timer (a broker reconnect may
#: reset the loop): the next event sets a new one.
EVENT_BATCH_LOST_S = 1.0


class OmniConsumer(Consumer):
    """Celery's consumer, reading through the vetting transport, reconnecting for ever,
    checking each task message on arrival, and publishing task events in batches.

    Celery buffers task events and publishes them on the event loop's next turn, one
    PUBLISH for whatever was buffered: in practice one or two events each time, and a
    wake-up of the loop for each event a pool thread sends (task-started, -succeeded).
    Each publish costs a round trip and kombu's whole publish path, on the loop's thread,
    just as the pool thread starts the task that came in. Here the first buffered event
    sets a timer and the loop publishes everything buffered `EVENT_BATCH_S` later
    (Celery's own cap, 24 events, still publishes at once): Flower sees events up to
    10 ms later, and a worker under load publishes a fraction of the batches.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._event_batch_lock = threading.Lock()
        #: When the pending batch's timer was set (None: no batch pending).
        self._event_batch_since: float | None = None

    def on_send_event_buffered(self) -> None:
        if not self.hub:
            return
        now = time.monotonic()
        with self._event_batch_lock:
            since = self._event_batch_since
            if since is not None and now - since < EVENT_BATCH_LOST_S:
                return  # a batch is pending (or its timer went with a reconnect)
            self._event_batch_since = now
        self.hub.call_soon(self._schedule_event_batch)

    def _schedule_event_batch(self) -> None:
        """On the loop's thread (its timers are not thread-safe)."""
        self.hub.call_later(EVENT_BATCH_S, self._publish_event_batch)

    def _publish_event_batch(self) -> None:
        with self._event_batch_lock:
            self._event_batch_since = None
        self._flush_events()

    def shutdown(self) -> None:
        """Publish the events still held for a batch, then Celery's shutdown."""
        try:
            self._flush_events()
        except Exception:  # noqa: BLE001 - the broker may be gone: shut down regardless
            log.warning("could not publish the last task events", exc_info=True)
        super().shutdown()

    def connection_for_read(self, heartbeat: float | None = None) -> Any:
        """The consuming connection, on the vetting transport when the broker is Redis."""
        url = self.app.conf.broker_read_url or self.app.conf.broker_url
        transport = consuming_transport(url) if isinstance(url, str) else None
        return self.ensure_connected(
            self.app.connection_for_read(heartbeat=heartbeat, transport=transport)
        )

    def ensure_connected(self, conn: Any) -> Any:
        """Celery's wait for the broker, trying every `RECONNECT_MAX_S` at most and for
        ever (Celery's own policy waits up to 30 s between tries and gives up after
        100): a worker that lost Redis for any length of time serves again within
        seconds of its return. The failed tries are logged as one outage."""
        outage = Outage("broker connection", log)
        ensure = conn.ensure_connection

        def ensure_connection(errback: Any = None, max_retries: Any = None, **kwargs: Any) -> Any:
            kwargs.update(interval_start=1.0, interval_step=1.0, interval_max=RECONNECT_MAX_S)
            connected = ensure(lambda exc, _interval: outage.failed(exc), None, **kwargs)
            outage.recovered()
            return connected

        conn.ensure_connection = ensure_connection
        return super().ensure_connected(conn)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handler = super().create_task_handler(*args, **kwargs)
        accept = prepare_accept_content(self.app.conf.accept_content)

        def on_task_received(message: Any) -> Any:
            if message.content_type not in accept:
                name = registry.type_to_name.get(message.content_type, "unknown")
                reason = f"content type {message.content_type!r} ({name}) refused: only JSON"
                return self._refuse(message, "content_type", reason)
            try:
                body = message.decode()
            except Exception as exc:  # whatever the JSON decoder raises
                return self.on_decode_error(message, exc)
            headers = message.headers or {}
            if not all(isinstance(headers.get(k), str) and headers[k] for k in ("task", "id")):
                reason = "missing headers: a task message needs string 'task' and 'id' headers"
                return self._refuse(message, "headers", reason)
            problem = body_problem(body)
            if problem is not None:
                return self._refuse(message, *problem)
            task = self.app.tasks.get(headers["task"])
            reason = reroute_reason(task, message, body)
            if reason is not None:
                return self._reroute(task, message, body, reason)
            return handler(message)

        return on_task_received

    def _reroute(self, task: Any, message: Any, body: Any, reason: str) -> None:
        """Publish a foreign client's message again where `.delay()` would have
        (`workers.lifecycle.reroute`); refuse it when no producer would have sent it."""
        try:
            reroute(task, message, body, reason)
        except RequestValidationError as exc:
            self._refuse(message, exc.field, exc.message)
        except RequestConflictError as exc:  # its id holds another request: that one's
            _record(message, str(exc))  # result (or run) stands, so none is stored here
            message.reject_log_error(log, self.connection_errors)
        except Exception:  # Redis unreachable: it stays queued, to be routed again
            log.warning("could not re-route %s; requeued", _task_id(message), exc_info=True)
            message.reject_log_error(log, self.connection_errors, requeue=True)

    def _refuse(self, message: Any, field: str, reason: str) -> None:
        _record(message, reason)
        message.reject_log_error(log, self.connection_errors)
        fail_task(_task_id(message), field, reason)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        reason = f"undecodable message: {exc}"
        _record(message, reason)
        super().on_decode_error(message, exc)
        fail_task(_task_id(message), "body", reason)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        reason = "unknown message format: not a task message"
        _record(message, reason)
        super().on_unknown_message(body, message)
        fail_task(_task_id(message), "headers", reason)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        _record(message, f"unknown task: {exc}")
        super().on_unknown_task(body, message, exc)  # marks the task failed (NotRegistered)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        reason = f"invalid task message: {exc}"
        _record(message, reason)
        super().on_invalid_task(body, message, exc)
        fail_task(_task_id(message), "message", reason)


def body_problem(body: Any) -> tuple[str, str] | None:
    """(field, reason) when a decoded body is not Celery's `[args, kwargs, embed]`."""
    if not isinstance(body, (list, tuple)) or len(body) != 3:
        return "body", "message body must be a JSON array [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, (list, tuple)):
        return "args", f"args must be a JSON array, not {type(args).__name__}"
    if not isinstance(kwargs, dict):
        return "kwargs", f"kwargs must be a JSON object, not {type(kwargs).__name__}"
    if not isinstance(embed, (dict, type(None))):
        return "embed", f"embed must be a JSON object, not {type(embed).__name__}"
    return None


def _task_id(message: Any) -> str | None:
    """The task id of a message: its `id` header, else its correlation id."""
    task_id = (message.headers or {}).get("id") or (message.properties or {}).get("correlation_id")
    return task_id if isinstance(task_id, str) and task_id else None


def _record(message: Any, reason: str) -> None:
    headers = message.headers or {}
    queue = (message.delivery_info or {}).get("routing_key") or "unknown"
    name = headers.get("task")
    record_rejection(
        runtime.redis,
        reason,
        task_id=_task_id(message),
        task_name=name if isinstance(name, str) else None,
        queue=queue,
        body=message.body,
    )
