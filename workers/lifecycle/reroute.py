"""Messages published again where they belong: another client's, put where `.delay()`
would, and any message for a model this worker does not serve, passed on to its model.

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

A foreign message at levels 1-9 in its pool's queue (or a queue of the pool's models)
runs where it is, so an integer priority is honoured. A message that cannot be
published again (bad fields, positional args, an unregistered model) raises
`RequestValidationError`; the consumer refuses and records it.

**Another model.** A diffusion worker serves one model (`diffusion.model`), but reads
the pool's shared queue too. A DiT message whose `model` is set and names another
model, whatever its origin and broker, is passed on to that model's queue
(`keys.model_queue`) with its id and its priority, then acked. A message accepted by a
producer keeps its acceptance (it is not checked or counted again). It never goes back
to the queue it came from: one that came from its own model's queue to a worker serving
another model (a worker reading a queue that is not its own) is refused and recorded.
A message without `model` is for the default model of its kind (`diffusion.model`,
or for a video `diffusion.video_model` / `video_image_model`): it runs on the worker
that takes it if that worker serves it, and is passed on otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

from omni_tasks.coordination import admission, idempotency, keys
from omni_tasks.coordination.counters import count_outcome
from omni_tasks.errors import RequestValidationError
from omni_tasks.model_registry import default_model, dit_model
from omni_tasks.scheduling.policies import create_policy
from omni_tasks.tasks.base import OmniTask
from omni_tasks.tasks.celery_app import delivered_level
from omni_tasks.tasks.router import resolve_route
from omni_tasks.tasks.transport import PUBLISHED_PROPERTY
from workers.runtime import runtime

log = logging.getLogger(__name__)

#: Header of a message published again here (shown in Flower; the worker ignores it).
REROUTED_HEADER = "omni_rerouted"


def reroute_reason(task: Any, message: Any, body: Any = None) -> str | None:
    """Why a message must be published again, or None where it can run as it is."""
    if not isinstance(task, OmniTask):
        return None
    other = other_model(task, body)
    if other is not None:
        return f"for model {other!r}; this worker serves {runtime.config.diffusion.model!r}"
    if not runtime.config.broker_is_redis:
        return None
    if (message.properties or {}).get(PUBLISHED_PROPERTY):
        return None
    if not _level(message):
        return "sent without a priority: ordered by its priority class"
    queue = (message.delivery_info or {}).get("routing_key")
    if not _in_pool(task, queue):
        return f"sent to queue {queue!r}, not its pool's ({task.stage_queue!r})"
    return None


def other_model(task: OmniTask, body: Any) -> str | None:
    """The model a DiT message names when this worker serves another one, else None."""
    if task.stage != "dit" or not isinstance(body, (list, tuple)) or len(body) != 3:
        return None
    kwargs = body[1]
    if not isinstance(kwargs, dict):
        return None
    model = kwargs.get("model")
    config = runtime.config
    if model is None and task.request_type is not None:  # the default of its kind
        model = default_model(task.request_type.value, bool(kwargs.get("image")), config)
    if not isinstance(model, str) or not model or model == config.diffusion.model:
        return None
    return model


def reroute(task: OmniTask, message: Any, body: Any, reason: str) -> None:
    """Publish `message` again as `.delay()` would have (or pass it on to its model's
    queue), keeping its id and its priority, then ack the original. Raises
    `RequestValidationError` for a message no omni-tasks producer would have sent."""
    args, kwargs, embed = body
    headers = message.headers or {}
    options: dict[str, Any] = {
        "task_id": headers["id"],  # also its request id (`OmniTask.build_request`)
        "headers": {REROUTED_HEADER: reason},
        "expires": headers.get("expires"),
    }
    if other_model(task, body) is not None:
        options.update(pass_on_options(task, message, kwargs))
    elif _level(message):
        options["priority"] = _level(message)
    embed = embed or {}
    for option, field in (("link", "callbacks"), ("link_error", "errbacks"), ("chain", "chain")):
        if embed.get(field):
            options[option] = embed[field]
    with admission.unlimited():  # already in the broker: never refused now
        sent = task.apply_async(args, kwargs, **options)
    message.ack()
    if getattr(sent, "repeat", False):  # its twin was accepted before: not run twice
        count_outcome(runtime.redis, task.stage_queue, "duplicates")
        log.info("%s: a duplicate (re-routed twin), not run", headers["id"])
        return
    log.info("re-routed %s (%s): %s", headers["id"], task.name, reason)


def pass_on_options(task: OmniTask, message: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The queue and priority of a message passed on to its model, and the mark of its
    first acceptance if it has one. Its route is the router's (its model's queue, or the
    worker holding its cache keys), never the queue it came from."""
    headers = message.headers or {}
    request = task.build_request(kwargs, headers["id"])  # refuses an unregistered model
    route = resolve_route(request, task.stage, create_policy(runtime.config), runtime.redis)
    came_from = (message.delivery_info or {}).get("routing_key")
    queue = route.queue
    if queue == came_from:
        queue = keys.model_queue(task.stage_queue, dit_model(request, runtime.config))
    if queue == came_from:
        raise RequestValidationError(
            "model",
            f"came from {queue!r} to a worker serving {runtime.config.diffusion.model!r}: "
            "a worker reads another model's queue, so this message would loop",
        )
    level = _passed_level(message)
    options: dict[str, Any] = {
        "queue": queue,
        "priority": route.level if level is None else level,
    }
    if headers.get(idempotency.ACCEPTED_HEADER):
        options["headers"] = {
            REROUTED_HEADER: f"passed on to model {request.model!r}",
            idempotency.ACCEPTED_HEADER: True,
        }
    return options


def _passed_level(message: Any) -> int | None:
    """The level (0 highest) a message keeps when passed on: the one it was published at
    by omni-tasks (or any client, on RabbitMQ), a foreign Redis message's 1-9; None
    for a message sent without one, which its priority class then orders."""
    raw = (message.properties or {}).get("priority")
    if not runtime.config.broker_is_redis:
        return delivered_level(raw, False) if isinstance(raw, int) else None
    if (message.properties or {}).get(PUBLISHED_PROPERTY):
        return raw if isinstance(raw, int) else 0
    return _level(message) or None


def _level(message: Any) -> int:
    """The integer priority its client gave (kombu rounds it down to a list's level)."""
    value = (message.properties or {}).get("priority")
    return value if isinstance(value, int) and 0 < value <= max(keys.PRIORITY_STEPS) else 0


def _in_pool(task: OmniTask, queue: Any) -> bool:
    """Whether `queue` is the task's pool queue, or (DiT) a model's or a worker's own."""
    if queue == task.stage_queue:
        return True
    if task.stage != "dit" or not isinstance(queue, str):
        return False
    own_queues = runtime.keys.worker_queue("")
    return queue.startswith((own_queues, keys.model_queue(task.stage_queue, "")))
