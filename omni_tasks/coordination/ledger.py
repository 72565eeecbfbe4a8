"""The ledger of accepted requests: what makes "nothing accepted is lost" hold by
construction rather than by the broker's good behaviour.

`.delay()` records the request here (task name, args, kwargs, publish options) before
it publishes the message, in the same round trip as its admission
(`scripts/admit.lua`). A request stays "open" until its result is final. The
worker-side reaper (`workers.lifecycle.reaper`) publishes an open request again when
it is nowhere: not queued, not held by a live worker, not done. That covers
the message kombu's Redis transport can drop (BRPOP pops it, and Redis restarts before
the worker records it as unacked) and any other loss between the producer and a result.
A request published twice runs once: the worker skips a message whose result is
already final (`workers.handlers`). Only with a Redis broker: RabbitMQ confirms each
publish and requeues what a lost connection held.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from omni_tasks.coordination.client import OmniRedis
from omni_tasks.coordination.keyspace import KeySpace

#: Message header of a request published again: the worker checks it is not done yet.
REPUBLISHED_HEADER = "omni_republished"
#: Publish options worth keeping for a second publish (the chain carries later stages).
KEPT_OPTIONS = (
    "queue",
    "priority",
    "expires",
    "chain",
    "link",
    "link_error",
    "root_id",
    "parent_id",
    "group_id",
    "kwargsrepr",
)


@dataclass(frozen=True)
class Entry:
    """A request's ledger entry, ready to be recorded with its admission in one step
    (`admission.admit`): the task id and the JSON fields a second publish needs."""

    task_id: str
    task: str
    args: str
    kwargs: str
    options: str

    def keys_in(self, space: KeySpace) -> list[str]:
        """KEYS of its entry and the open set in `scripts/admit.lua`, under `space`."""
        return [space.ledger(self.task_id), space.ledger_open()]

    def script_args(self, ttl_s: int) -> list[Any]:
        """ARGV[6..11] of `scripts/admit.lua` (the entry kept `ttl_s`: `result_expires`)."""
        return [self.task_id, ttl_s, self.task, self.args, self.kwargs, self.options]


def prepare(task: str, task_id: str, args: Any, kwargs: dict[str, Any], options: dict) -> Entry:
    """The entry of a request about to be published."""
    return Entry(
        task_id=task_id,
        task=task,
        args=json.dumps(list(args)) if args else "[]",
        kwargs=json.dumps(kwargs),
        options=json.dumps(_jsonable(options)),
    )


def record(client: OmniRedis, found: Entry, ttl_s: int) -> None:
    """Record an accepted request (`prepare`) on its own, kept `ttl_s` (`result_expires`;
    `admission.admit` records it together with its admission on the send path)."""
    task_id = found.task_id
    fields = {"task": found.task, "args": found.args, "kwargs": found.kwargs}
    pipe = client.pipeline(transaction=True)
    pipe.hset(client.keyspace.ledger(task_id), mapping={**fields, "options": found.options})
    pipe.expire(client.keyspace.ledger(task_id), ttl_s)
    pipe.zadd(client.keyspace.ledger_open(), {task_id: time.time()})
    pipe.execute()


def forget(client: OmniRedis, task_ids: Iterable[str]) -> None:
    """Close requests whose result is final (or whose publish failed)."""
    ids = list(task_ids)
    if not ids:
        return
    pipe = client.pipeline(transaction=False)
    pipe.zrem(client.keyspace.ledger_open(), *ids)
    pipe.delete(*(client.keyspace.ledger(i) for i in ids))
    pipe.execute()


def open_since(client: OmniRedis, before: float, limit: int = 500) -> list[str]:
    """Ids of open requests last published before `before` (oldest first)."""
    return list(client.zrangebyscore(client.keyspace.ledger_open(), "-inf", before, 0, limit))


def entry(client: OmniRedis, task_id: str) -> dict[str, Any] | None:
    """What it takes to publish a request again: task, args, kwargs, options."""
    raw = client.hgetall(client.keyspace.ledger(task_id))
    if not raw:
        return None
    options = json.loads(raw["options"])
    if isinstance(options.get("expires"), str):
        options["expires"] = datetime.fromisoformat(options["expires"])
    return {
        "task": raw["task"],
        "args": json.loads(raw["args"]),
        "kwargs": json.loads(raw["kwargs"]),
        "options": options,
    }


def touch(client: OmniRedis, task_id: str) -> None:
    """A request published again: its grace period starts over."""
    client.zadd(client.keyspace.ledger_open(), {task_id: time.time()}, xx=True)


def _jsonable(options: dict) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for name in KEPT_OPTIONS:
        value = options.get(name)
        if value is None:
            continue
        if isinstance(value, datetime):
            value = value.isoformat()
        if not isinstance(value, (str, int, float, bool)):  # JSON as it is: no test
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                continue  # not part of the JSON contract: a second publish goes without it
        kept[name] = value
    return kept
