"""Recording messages a worker refuses, so nothing accepted disappears silently.

Each record keeps the start of the refused message as it arrived (`body`: at most
`MAX_BODY_CHARS` characters, bytes that are not UTF-8 shown as `\\xNN`) and its full
length in bytes (`size`), so a 20 MB garbage entry costs the list 4 KiB, not 20 MB.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from omni_tasks.coordination.client import OmniRedis

log = logging.getLogger(__name__)
MAX_RECORDS = 1000
MAX_BODY_CHARS = 4096


def record_rejection(
    client: OmniRedis,
    reason: str,
    *,
    task_id: str | None = None,
    task_name: str | None = None,
    queue: str = "unknown",
    body: Any = None,
) -> None:
    """Push a JSON record onto the capped rejected list (with `client`, the worker's) and
    count it; never raises."""
    preview, size = _bounded(body)
    record = {
        "time": time.time(),
        "reason": reason,
        "task_id": task_id,
        "task": task_name,
        "queue": queue,
        "body": preview,
        "size": size,
    }
    try:
        pipe = client.pipeline(transaction=True)
        pipe.lpush(client.keyspace.rejected(), json.dumps(record))
        pipe.ltrim(client.keyspace.rejected(), 0, MAX_RECORDS - 1)
        pipe.hincrby(client.keyspace.stats(queue), "rejected", 1)
        pipe.execute()
    except Exception:  # recording must not take the worker down
        log.exception("could not record rejected message %s", task_id)
    log.error("rejected message %s (%s): %s", task_id, task_name, reason)


def list_rejections(client: OmniRedis, limit: int = 100) -> list[dict[str, Any]]:
    """The newest `limit` records, newest first."""
    return [json.loads(r) for r in client.lrange(client.keyspace.rejected(), 0, limit - 1)]


def _bounded(body: Any) -> tuple[str | None, int | None]:
    """(the first `MAX_BODY_CHARS` of `body` as text, its whole length in bytes)."""
    if body is None:
        return None, None
    if isinstance(body, (bytes, bytearray, memoryview)):
        raw = bytes(body[:MAX_BODY_CHARS])
        return raw.decode("utf-8", errors="backslashreplace")[:MAX_BODY_CHARS], len(body)
    text = _text(body)
    return text[:MAX_BODY_CHARS], len(text.encode("utf-8", errors="surrogatepass"))


def _text(body: Any) -> str:
    if isinstance(body, str):
        return body
    try:
        return json.dumps(body, default=repr)
    except (TypeError, ValueError):
        return repr(body)
