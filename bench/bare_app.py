"""Bare Celery baseline for P1: the same broker, serializer, acks, prefetch, priority
transport and events as omni-tasks, and a no-op task; no routing or request checks."""

from __future__ import annotations

import os

from celery import Celery

URL = os.environ.get("OMNI_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("bare", broker=URL, backend=URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={
        "priority_steps": list(range(10)),
        "sep": ":",
        "queue_order_strategy": "priority",
        "visibility_timeout": 900,
    },
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_track_started=True,
    result_extended=True,
)


@app.task(name="bare.noop")
def noop(**kwargs: object) -> dict[str, object]:
    return {"request_id": kwargs.get("request_id"), "text": ""}
