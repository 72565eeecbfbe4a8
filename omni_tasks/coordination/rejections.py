"""Recording messages a worker refuses, so nothing accepted disappears silently."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from omni_tasks.coordination import keys
from omni_tasks.coordination.client import get_redis

log = logging.getLogger(__name__)
MAX_RECORDS = 1000
MAX_BODY_CHARS = 65536


def record_rejection(
    reason: str,
    *,
    task_id: str | None = None,
    task_name: str | None = None,
    queue: str = "unknown",
    body: Any = None,
) -> None:
    """Push a JSON record onto the capped rejected list and count it; never raises."""
    record = {
        "time": time.time(),
        "reason": reason,
        "task_id": task_id,
        "task": task_name,
        "queue": queue,
        "body": _preview(body),
    }
    try:
        client = get_redis()
        pipe = client.pipeline(transaction=True)
        pipe.lpush(keys.rejected(), json.dumps(record))
        pipe.ltrim(keys.rejected(), 0, MAX_RECORDS - 1)
        pipe.hincrby(keys.stats(queue), "rejected", 1)
        pipe.execute()
    except Exception:  # recording must not take the worker down
        log.exception("could not record rejected message %s", task_id)
    log.error("rejected message %s (%s): %s", task_id, task_name, reason)


def list_rejections(limit: int = 100) -> list[dict[str, Any]]:
    """The newest `limit` records, newest first."""
    return [json.loads(r) for r in get_redis().lrange(keys.rejected(), 0, limit - 1)]


def _preview(body: Any) -> str | None:
    if body is None:
        return None
    if isinstance(body, bytes):
        text = body.decode("utf-8", errors="backslashreplace")
    elif isinstance(body, str):
        text = body
    else:
        try:
            text = json.dumps(body, default=repr)
        except (TypeError, ValueError):
            text = repr(body)
    return text[:MAX_BODY_CHARS]
