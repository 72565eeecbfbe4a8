"""The worker's message consumer: refuses non-JSON messages before they reach a pool.

Celery defers decoding to the pool, where a pickled body would fail deep inside the
tracer; checking the content type on arrival rejects it at once, records it, marks the
task failed (so a caller waiting on it learns why) and keeps the worker serving.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer
from kombu.serialization import prepare_accept_content, registry

from omni_tasks.coordination.rejections import record_rejection
from omni_tasks.errors import RequestValidationError

log = logging.getLogger(__name__)


class OmniConsumer(Consumer):
    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handler = super().create_task_handler(*args, **kwargs)
        accept = prepare_accept_content(self.app.conf.accept_content)

        def on_task_received(message: Any) -> Any:
            if message.content_type not in accept:
                name = registry.type_to_name.get(message.content_type, "unknown")
                return self._refuse(
                    message,
                    f"content type {message.content_type!r} ({name}) refused: only JSON accepted",
                )
            return handler(message)

        return on_task_received

    def _refuse(self, message: Any, reason: str) -> None:
        _record(message, reason)
        task_id = (message.headers or {}).get("id")
        message.reject_log_error(log, self.connection_errors)
        if task_id:
            self.app.backend.mark_as_failure(
                task_id, RequestValidationError("content_type", reason), request=None
            )

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        _record(message, f"undecodable message: {exc}")
        super().on_decode_error(message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        _record(message, f"unknown task: {exc}")
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        _record(message, f"invalid task message: {exc}")
        super().on_invalid_task(body, message, exc)


def _record(message: Any, reason: str) -> None:
    headers = message.headers or {}
    queue = (message.delivery_info or {}).get("routing_key") or "unknown"
    record_rejection(
        reason,
        task_id=headers.get("id"),
        task_name=headers.get("task"),
        queue=queue,
        body=message.body,
    )
