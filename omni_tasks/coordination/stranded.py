"""Messages in Redis lists that no omni-tasks worker reads: they would wait forever,
and no queue count would show them. `get_health_status()` reports them.

They come from clients that sent without `queue=` (Celery's default queue, `celery`),
to a misspelt queue, or with transport options that name lists differently (another
priority separator). A list is counted when its oldest entry looks like a kombu
message. It is stranded when no live worker consumes its queue, at any level. The
pools' queues, the registered models' queues and the diffusion workers' own queues are
never stranded: workers drain a dead worker's queue
(`cache_directory.sweep_dead_workers`).

Finding them scans the keyspace, so the result is kept in Redis for `CACHE_S`, shared
by every process that asks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination import keys
from omni_tasks.coordination.client import OmniRedis
from omni_tasks.model_registry import model_queues

#: How long one scan's result serves every process.
CACHE_S = 30
#: The keys kombu's Redis envelope always has.
_ENVELOPE = ("body", "headers", "properties")


def stranded_lists(
    client: OmniRedis, config: CoreModuleConfig, workers: Iterable[dict[str, Any]]
) -> dict[str, int]:
    """List name -> messages waiting, for every list of messages no live worker reads
    (Redis broker only; empty otherwise)."""
    if not config.broker_is_redis:
        return {}
    cached = client.get(client.keyspace.stranded())
    if cached is not None:
        return json.loads(cached)
    # A registered model's queue is never stranded: its requests wait for a worker
    # serving the model, and health names the models no live worker serves.
    consumed = {*config.pool_queues(), *model_queues(config).values()}
    for worker in workers:
        consumed.update(worker.get("queues") or [])
    found = dict(_scan(client, consumed, config.key_prefix))
    client.set(client.keyspace.stranded(), json.dumps(found), ex=CACHE_S)
    return found


def _scan(client: OmniRedis, consumed: set[str], prefix: str) -> Iterable[tuple[str, int]]:
    own = client.keyspace.worker_queue("")
    for key in client.scan_iter(count=1000, _type="LIST"):
        queue, _ = keys.parse_queue_key(key)
        if queue in consumed or queue.startswith(own) or key.startswith(prefix + ":"):
            continue
        if _is_message(client.lindex(key, -1)):
            yield key, int(client.llen(key))


def _is_message(raw: str | None) -> bool:
    if raw is None:
        return False
    try:
        entry = json.loads(raw)
    except ValueError:
        return False
    return isinstance(entry, dict) and all(k in entry for k in _ENVELOPE)


def health_issues(stranded: dict[str, int]) -> tuple[list[str], list[str]]:
    """Issues and recommendations for `get_health_status()`."""
    issues, advice = [], []
    for name, count in sorted(stranded.items()):
        shown = name.replace(keys.PRIORITY_SEP, "\\x06\\x16")
        issues.append(f"{count} message(s) in Redis list {shown!r}, which no worker reads")
        advice.append(
            f"send with queue='ar', 'diffusion' or 'speech' (docs/wire.md); {shown!r} looks "
            "like a client's default queue or other transport options"
        )
    return issues, advice
