"""The colon layout in Redis, converted when a worker starts: priority lists named with a
colon between queue and level (`ar:3`), whose messages no worker reads, and kombu
exchange bindings joined with a colon, which kombu cannot split (a control command
would fail on every worker). The wire's separator is `keys.PRIORITY_SEP`.

Idempotent and cheap: an EXISTS per colon list name and a scan of the binding sets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from omni_tasks.coordination import keys
from omni_tasks.coordination.client import OmniRedis

log = logging.getLogger(__name__)

#: kombu's Redis transport keeps each exchange's bindings in a set under this prefix.
BINDING_PREFIX = "_kombu.binding."


def convert(client: OmniRedis, queues: Iterable[str]) -> dict[str, int]:
    """Move the colon lists of `queues` to the wire's lists (same level, same order) and
    drop bindings in the colon format (kombu declares them again as workers start and
    producers publish). Returns how many messages moved and bindings were dropped."""
    scripts = client.scripts
    moved = 0
    for queue in queues:
        for level in keys.PRIORITY_STEPS[1:]:
            old = f"{queue}{keys.COLON_PRIORITY_SEP}{level}"
            if client.exists(old):
                moved += int(scripts.move_all(keys=[old, keys.queue_key(queue, level)]))
    dropped = 0
    for key in client.scan_iter(match=BINDING_PREFIX + "*", count=500):
        stale = [m for m in client.smembers(key) if keys.PRIORITY_SEP not in m]
        if stale:
            dropped += int(client.srem(key, *stale))
    if moved or dropped:
        log.warning(
            "converted an older layout: %d queued message(s) moved, %d binding(s) dropped",
            moved,
            dropped,
        )
    return {"moved": moved, "bindings_dropped": dropped}
