"""Which of some requests wait in a queue, read from the old end of each list only.

The reaper asks this of the requests whose ledger entries are due (accepted longer than
`ledger_grace_s` ago, not final, neither held nor unacked): a request still queued must
not be published again. kombu LPUSHes new messages and BRPOPs the oldest, and restores
a message at the old end, so a list is in publish order from its tail: the ledger's
time of each message (`KeySpace.ledger_open`) grows toward the head. The walk reads a
list's tail in chunks and stops when the requests it looks for are found or when the
newest message of a chunk was published after all of them: what lies beyond is newer
still. Its cost is O(the messages older than the newest request asked about), not
O(queued); `WALK_LIMIT` bounds a list with no ledger times to go by (foreign
messages), which then counts as holding the requests not found (they are asked about
again next pass, never published twice for it).

Order can break where messages are moved between lists (a dead worker's own queue
moved back to its pool): such a request may be published again while still queued.
Its second message runs nothing: a worker skips a request that ran or runs
(`coordination.runs`).
"""

from __future__ import annotations

import json

from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination import keys, worker_index
from omni_tasks.coordination.client import OmniRedis
from omni_tasks.model_registry import model_queues

#: Messages read per LRANGE.
CHUNK = 500
#: The most messages read from one list in one call.
WALK_LIMIT = 20_000
#: Clocks of the hosts that publish and reap may differ by this much.
CLOCK_SLACK_S = 5.0


def queued_among(
    client: OmniRedis, config: CoreModuleConfig, ids: set[str], published_before: float
) -> set[str]:
    """Of `ids`, all published before `published_before` (a time), those with a message
    waiting in a pool's, a model's or a diffusion worker's own queue under `config`
    (see the module docstring)."""
    if not ids:
        return set()
    newest = published_before + CLOCK_SLACK_S
    lists = queue_lists(client, config)
    pipe = client.pipeline(transaction=False)
    for name in lists:
        pipe.llen(name)
    found: set[str] = set()
    for name, length in zip(lists, pipe.execute(), strict=True):
        if length:
            found |= _walk(client, name, int(length), ids - found, newest)
        if found >= ids:
            break
    return found


def queue_lists(client: OmniRedis, config: CoreModuleConfig) -> list[str]:
    """Every list a request can wait in: each level of the pools' queues, of the
    registered models' queues and of the models live diffusion workers serve, and of
    the indexed diffusion workers' own queues."""
    queues = [*config.pool_queues(), *model_queues(config).values()]
    for model in _served_models(client):
        queue = keys.model_queue(config.diffusion.queue, model)
        if queue not in queues:
            queues.append(queue)
    lists = [k for q in queues for k in keys.queue_keys(q)]
    return lists + [key for key, _, _ in worker_index.own_queue_keys(client)]


def _served_models(client: OmniRedis) -> list[str]:
    hosts = worker_index.live(client, [worker_index.DIT])
    pipe = client.pipeline(transaction=False)
    for host in hosts:
        pipe.hget(client.keyspace.worker(host), "models")
    models = []
    for raw in pipe.execute() if hosts else []:
        try:
            model = json.loads(raw or "{}").get("dit")
        except (ValueError, AttributeError):
            continue
        if isinstance(model, str):
            models.append(model)
    return models


def _walk(client: OmniRedis, name: str, length: int, wanted: set[str], newest: float) -> set[str]:
    """Of `wanted`, those in list `name`, read from its tail (oldest) toward its head."""
    found: set[str] = set()
    end = length
    while end > 0 and length - end < WALK_LIMIT and found < wanted:
        start = max(0, end - CHUNK)
        ids = [message_id(raw) for raw in client.lrange(name, start, end - 1)]
        found |= wanted.intersection(ids)
        end = start
        # The chunk's newest message (the head end): published after every one wanted?
        if ids and ids[0] not in wanted:
            score = client.zscore(client.keyspace.ledger_open(), ids[0])
            if score is not None and score > newest:
                break
    return found


def message_id(raw: str | bytes) -> str:
    """The task id of a kombu message as queued ('' when unreadable)."""
    try:
        headers = json.loads(raw).get("headers") or {}
        return str(headers.get("id") or "")
    except (ValueError, TypeError, AttributeError):
        return ""
