"""Messages from Celery clients that do not import omni_tasks, put where `.delay()` would.

Every message an omni-tasks process publishes to Redis carries
`transport.PUBLISHED_PROPERTY` and was routed by the router. A message without it came
from another client (a plain Celery app, a Node or Go Celery client). Two kinds of those
are published again through the task's own send path, and the original is acked:

- **Level 0.** kombu publishes a message sent without a priority there, the level
  omni-tasks gives "high" requests. Its `priority` class kwarg (default "normal")
  decides its level instead, as for `.delay()`. A client that wants the top level
  sends `"priority": "high"`.
- **The wrong pool.** For example, an image request in the text pool's queue.

The send path validates the message, routes it and records it in the ledger. It also
admits it, without the limit: the message was already in the broker. The first
message's id is kept, so the caller's result is the same.

A foreign message at levels 1-9 in its pool's queue runs where it is, so an integer
priority is honoured. A message that cannot be published again (bad fields,
positional args) raises `RequestValidationError`; the consumer refuses and records it.
"""

from __future__ import annotations

import logging
from typing import Any

from omni_tasks.config import get_config
from omni_tasks.coordination import admission, keys
from omni_tasks.coordination.counters import count_outcome
from omni_tasks.tasks.base import OmniTask
from omni_tasks.tasks.transport import PUBLISHED_PROPERTY

log = logging.getLogger(__name__)

#: Header of a message published again here (shown in Flower; the worker ignores it).
REROUTED_HEADER = "omni_rerouted"


def reroute_reason(task: Any, message: Any) -> str | None:
    """Why a message must be published again, or None where it can run as it is."""
    if not isinstance(task, OmniTask) or not get_config().broker_is_redis:
        return None
    if (message.properties or {}).get(PUBLISHED_PROPERTY):
        return None
    if not _level(message):
        return "sent without a priority: ordered by its priority class"
    queue = (message.delivery_info or {}).get("routing_key")
    if not _in_pool(task, queue):
        return f"sent to queue {queue!r}, not its pool's ({task.stage_queue!r})"
    return None


def reroute(task: OmniTask, message: Any, body: Any, reason: str) -> None:
    """Publish `message` again as `.delay()` would have, keeping its id and its integer
    priority (if any), then ack the original. Raises `RequestValidationError` for a
    message no omni-tasks producer would have sent."""
    args, kwargs, embed = body
    headers = message.headers or {}
    options: dict[str, Any] = {
        "task_id": headers["id"],  # also its request id (`OmniTask.build_request`)
        "headers": {REROUTED_HEADER: reason},
        "expires": headers.get("expires"),
    }
    level = _level(message)
    if level:
        options["priority"] = level
    embed = embed or {}
    for option, field in (("link", "callbacks"), ("link_error", "errbacks"), ("chain", "chain")):
        if embed.get(field):
            options[option] = embed[field]
    with admission.unlimited():  # already in the broker: never refused now
        sent = task.apply_async(args, kwargs, **options)
    message.ack()
    if getattr(sent, "repeat", False):  # its twin was accepted before: not run twice
        count_outcome(task.stage_queue, "duplicates")
        log.info("%s: a duplicate (re-routed twin), not run", headers["id"])
        return
    log.info("re-routed %s (%s): %s", headers["id"], task.name, reason)


def _level(message: Any) -> int:
    """The integer priority its client gave (kombu rounds it down to a list's level)."""
    value = (message.properties or {}).get("priority")
    return value if isinstance(value, int) and 0 < value <= max(keys.PRIORITY_STEPS) else 0


def _in_pool(task: OmniTask, queue: Any) -> bool:
    if queue == task.stage_queue:
        return True
    own = keys.worker_queue("")
    return task.stage == "dit" and isinstance(queue, str) and queue.startswith(own)
