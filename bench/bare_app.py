"""Bare Celery baselines: the same broker, serializer, acks, prefetch, priority
transport and events as omni-tasks; no routing, request checks, admission or ledger.

- P1: a no-op task.
- P3: a hand-rolled Celery + vLLM worker: a task that runs the worker's own
  `VllmTextEngine` (one per worker process, built on first use), so P3 can tell the
  cost of Celery's message path from the cost of omni-tasks on top of it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

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
        "sep": "\x06\x16",  # kombu's default, as omni-tasks uses
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


_engine: dict[str, Any] = {}
_engine_lock = threading.Lock()


def _text_engine() -> Any:
    with _engine_lock:
        if "engine" not in _engine:
            from omni_tasks.config import get_config
            from workers.engines.vllm_engine import VllmTextEngine
            from workers.runtime import resolve_model

            model = resolve_model(get_config().ar.model, get_config())
            # The settings an omni-tasks AR worker builds its engine with.
            _engine["engine"] = VllmTextEngine(
                model, dtype="float32", max_num_seqs=32, kv_cache_gib=1.0
            )
        return _engine["engine"]


@app.task(name="bare.generate", bind=True)
def generate(self: Any, prompt: str, max_tokens: int) -> dict[str, object]:
    from workers.engines.base import TextParams

    started = time.time()
    out = _text_engine().generate(
        self.request.id, prompt, TextParams(max_tokens=max_tokens, temperature=0.0), 300
    )
    return {"completion_tokens": out.completion_tokens, "started_at": started}
