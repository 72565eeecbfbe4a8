"""The Redis transport of a worker's consuming connection: it vets each raw queue entry
before kombu builds a message from it.

kombu's Redis channel pops an entry with BRPOP, JSON-decodes it and builds a `Message`
(base64-decoding the body) inside the worker's event loop, outside any of Celery's error
handling. An entry that is not JSON, not a JSON object, lacks `properties`, or has a
body that is not base64 raises there, and the worker exits ("Unrecoverable error"): the
popped entry is lost, or, once kombu has recorded it as unacked, restored later to kill
the next worker. Here each entry is checked first; a malformed one is recorded in the
rejected list (its first bytes and total size) and dropped, its task (where the entry
names one) is marked FAILURE, and the worker keeps serving. Oversized entries are
refused before they are parsed.

`OmniConsumer.connection_for_read` selects `OmniRedisTransport` when the broker URL
selects kombu's plain Redis transport (redis://, rediss://), `OmniSentinelTransport`
when it selects kombu's Sentinel transport (sentinel://); other brokers are untouched.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, redis, virtual
from kombu.utils.encoding import bytes_to_str

from omni_tasks.coordination import admission
from omni_tasks.coordination.outage import CONNECTION_ERRORS, describe
from omni_tasks.coordination.rejections import record_rejection
from omni_tasks.errors import RequestValidationError
from omni_tasks.image_input import MAX_IMAGE_BYTES
from omni_tasks.tasks.transport import OmniRedisChannel as KeptClientChannel
from omni_tasks.tasks.transport import is_plain_redis, is_sentinel
from workers import task_context

log = logging.getLogger(__name__)


def _b64_len(n: int) -> int:
    return 4 * ((n + 2) // 3)


#: The largest entry a worker parses: a request carrying the largest image the producer
#: accepts (base64 in the kwargs, base64 again as the message body), with 1 MiB to spare.
MAX_ENTRY_BYTES = _b64_len(_b64_len(MAX_IMAGE_BYTES) + 1024 * 1024) + 64 * 1024
#: How far from its end an oversized entry is searched for its task id (kombu writes
#: `headers` and `properties` after the body).
ID_SEARCH_TAIL_BYTES = 64 * 1024
#: What kombu's unacked bookkeeping reads from `delivery_info` (else it raises).
_ROUTE = ("exchange", "routing_key")
_TAIL_ID = re.compile(rb'"correlation_id":\s*"([^"\\]{1,255})"')


class OmniRedisQoS(redis.QoS):
    """kombu's Redis QoS, for which a lost connection is never fatal.

    A request keeps running when Celery loses its broker connection; by the time it
    acks (or rejects) its message, the channel that delivered it may be closed and its
    Redis gone or replaced (`ChannelDetachedError`), or Redis may still be away. Raised
    from an ack, that reaches Celery's event loop and the worker exits. Here the message
    is forgotten locally and stays in Redis's unacked hash: no live worker holds it any
    more (`workers.lifecycle.heartbeat.held_task_ids`), so the reaper gives it back
    within seconds (`workers.lifecycle.reaper`), and a worker skips it if its request
    already succeeded (one result per id)."""

    def ack(self, delivery_tag: str) -> None:
        try:
            super().ack(delivery_tag)
        except self.channel.connection_errors as exc:
            self._leave_to_reaper(delivery_tag, "ack", exc)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        except self.channel.connection_errors as exc:
            self._leave_to_reaper(delivery_tag, "requeue" if requeue else "reject", exc)

    def restore_unacked(self, client: Any = None) -> None:
        """kombu gives a closing channel's unacked messages back here; after a lost
        connection it cannot, and they stay in Redis for the reaper.

        A message whose task still runs in this worker is never given back: delivered
        again, it would run a second time beside the first. That happens when Redis is
        back before the worker notices it was gone (a Sentinel failover takes 2 s).
        It stays in Redis's unacked hash, for the reaper once no live worker holds it
        (the request's one result is there by then, and the copy is skipped)."""
        self._keep_running_ones()
        try:
            super().restore_unacked(client)
        except Exception as exc:  # noqa: BLE001 - whatever the cause, the worker must live on
            log.warning(
                "could not restore %d unacked message(s) on close (%s); the reaper will",
                len(self._delivered),
                describe(exc),
                exc_info=not isinstance(exc, CONNECTION_ERRORS),
            )
            self._delivered.clear()

    def _keep_running_ones(self) -> None:
        """Forget here (leaving them unacked in Redis) the delivered messages whose
        tasks run in this worker now."""
        from celery.worker import state

        running = set(task_context.running_task_ids())
        running.update(request.id for request in list(state.active_requests))
        for tag, message in list(self._delivered.items()):
            headers = getattr(message, "headers", None) or {}
            if isinstance(headers, dict) and headers.get("id") in running:
                self._delivered.pop(tag, None)
                log.info("left message %s of running task %s unacked", tag, headers["id"])

    def _leave_to_reaper(self, delivery_tag: str, what: str, exc: BaseException) -> None:
        """Forget `delivery_tag` here (kombu's bookkeeping of an ack) after its Redis
        side failed: its message stays unacked in Redis, for the reaper."""
        virtual.QoS.ack(self, delivery_tag)
        log.warning(
            "could not %s message %s (%s); it stays unacked for the reaper",
            what,
            delivery_tag,
            describe(exc),
        )


class OmniRedisChannel(KeptClientChannel):
    QoS = OmniRedisQoS

    def _brpop_read(self, **options: Any) -> bool:
        """kombu's `_brpop_read`, with the entry vetted before it is delivered."""
        try:
            try:
                dest_item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next poll reconnects
                raise
            if not dest_item:
                raise Empty()
            dest, item = dest_item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = vet_entry(item, dest)
            if payload is not None:
                self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None
            flush_reauth = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.7
            if flush_reauth is not None:
                flush_reauth()

    def _get(self, queue: str) -> dict[str, Any]:
        """kombu's `_get` (synchronous reads), skipping malformed entries."""
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                while item := client.rpop(self._q_for_pri(queue, pri)):
                    payload = vet_entry(item, queue)
                    if payload is not None:
                        self._maybe_update_queues_expire(client, queue)
                        return payload
            self._maybe_update_queues_expire(client, queue)
            raise Empty()


class OmniRedisTransport(redis.Transport):
    Channel = OmniRedisChannel


#: The name the worker's consuming connection selects the transport by: a name, not the
#: class, so the connection's info stays JSON (Flower's worker page, `inspect stats`).
TRANSPORT_ALIAS = "omni-redis"
TRANSPORT_ALIASES.setdefault(TRANSPORT_ALIAS, f"{__name__}:OmniRedisTransport")


class OmniSentinelChannel(OmniRedisChannel, redis.SentinelChannel):
    """The vetting channel on kombu's Sentinel channel (it follows a failover)."""


class OmniSentinelTransport(redis.SentinelTransport):
    Channel = OmniSentinelChannel


SENTINEL_TRANSPORT_ALIAS = "omni-sentinel"
TRANSPORT_ALIASES.setdefault(SENTINEL_TRANSPORT_ALIAS, f"{__name__}:OmniSentinelTransport")


def consuming_transport(url: str) -> str | None:
    """The vetting transport's name where `url` selects kombu's plain Redis transport
    or its Sentinel transport."""
    if is_plain_redis(url):
        return TRANSPORT_ALIAS
    return SENTINEL_TRANSPORT_ALIAS if is_sentinel(url) else None


def vet_entry(raw: bytes | str, queue: str) -> dict[str, Any] | None:
    """The decoded entry, or None once a malformed one is recorded and its task failed."""
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > MAX_ENTRY_BYTES:
        match = _TAIL_ID.search(data[-ID_SEARCH_TAIL_BYTES:])
        task_id = match.group(1).decode("utf-8", "replace") if match else None
        reason = f"message too large: {len(data)} bytes (at most {MAX_ENTRY_BYTES})"
        reject_entry(data, queue, "message", reason, task_id=task_id)
        return None
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError) as exc:
        reject_entry(data, queue, "message", f"queue entry is not JSON: {exc}")
        return None
    if not isinstance(payload, dict):
        kind = type(payload).__name__
        reject_entry(data, queue, "message", f"queue entry is a JSON {kind}, not an object")
        return None
    headers = payload.get("headers")
    properties = payload.get("properties")
    task_id = _task_id(headers, properties)
    problem = envelope_problem(payload)
    if problem is not None:
        field, reason = problem
        name = headers.get("task") if isinstance(headers, dict) else None
        reject_entry(data, queue, field, reason, task_id=task_id, task_name=_str(name))
        return None
    return payload


def envelope_problem(payload: dict[str, Any]) -> tuple[str, str] | None:
    """(field, reason) of the first part of a kombu envelope kombu or Celery would
    choke on, or None."""
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "properties", "message properties missing or not an object"
    if not isinstance(properties.get("delivery_tag"), str):
        return "properties.delivery_tag", "delivery tag missing or not a string"
    info = properties.get("delivery_info")
    if not (isinstance(info, dict) and all(isinstance(info.get(k), str) for k in _ROUTE)):
        return "properties.delivery_info", "delivery info lacks exchange and routing_key"
    if not isinstance(payload.get("headers", {}), (dict, type(None))):
        return "headers", "message headers are not an object"
    for key in ("content-type", "content-encoding"):
        if not isinstance(payload.get(key), (str, type(None))):
            return key, f"{key} is not a string"
    body = payload.get("body")
    if not isinstance(body, (str, type(None))):
        return "body", "message body is not a string"
    encoding = properties.get("body_encoding")
    if body and encoding == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            return "body", f"message body is not base64: {exc}"
    elif body and encoding not in (None, "utf-8"):
        return "properties.body_encoding", f"unknown body encoding {encoding!r}"
    return None


def reject_entry(
    raw: bytes,
    queue: str,
    field: str,
    reason: str,
    *,
    task_id: str | None = None,
    task_name: str | None = None,
) -> None:
    """Record a refused entry and, where it names a task, fail that task with `reason`."""
    from workers.runtime import runtime

    record_rejection(
        runtime.redis, reason, task_id=task_id, task_name=task_name, queue=queue, body=raw
    )
    fail_task(task_id, field, reason)


def fail_task(task_id: str | None, field: str, reason: str) -> None:
    """Mark `task_id` FAILURE with a `RequestValidationError`, so a caller waiting on it
    learns why, and release its admission; never raises (the worker must keep serving)."""
    if not task_id:
        return
    from omni_tasks.tasks import app
    from omni_tasks.tasks.definitions import PROMPT_STAGE_SUFFIX
    from workers.runtime import runtime

    try:
        app.backend.mark_as_failure(task_id, RequestValidationError(field, reason), request=None)
    except Exception:
        log.exception("could not mark refused task %s failed", task_id)
    try:  # the refused request (a chain's, from its first stage) leaves its pool's count
        ids = {task_id, task_id.removesuffix(PROMPT_STAGE_SUFFIX)}
        admission.release(runtime.redis, runtime.config.pool_queues(), ids)
    except Exception:
        log.exception("could not release the admission of refused task %s", task_id)


def _task_id(headers: Any, properties: Any) -> str | None:
    """The task id of an envelope: Celery's `id` header, else the correlation id."""
    task_id = headers.get("id") if isinstance(headers, dict) else None
    if not task_id and isinstance(properties, dict):
        task_id = properties.get("correlation_id")
    return _str(task_id)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
