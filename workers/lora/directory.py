"""What a diffusion worker tells Redis about its adapters: which ones it holds (in the
cache directory, beside its DiT cache keys, so affinity routing finds it) and how each
request's adapters were served (the pool's hit / load counters)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis

from omni_tasks import lora
from omni_tasks.coordination import cache_directory
from omni_tasks.coordination.outage import Outage

log = logging.getLogger(__name__)
_outage = Outage("adapter counts", log)


class AdapterDirectoryListener:
    """Mirrors every adapter load and unload of one worker, serving `model`, into the
    cache directory."""

    def __init__(self, client: redis.Redis, worker: str, queue: str, model: str) -> None:
        self.client, self.worker, self.queue = client, worker, queue
        self.model = model

    def on_insert(self, key: str, nbytes: int) -> None:
        cache_directory.record_insert(
            self.client, self.worker, self.queue, lora.directory_key(key, self.model), nbytes
        )

    def on_evict(self, key: str, reason: str) -> None:
        cache_directory.record_remove(self.client, self.worker, lora.directory_key(key, self.model))


def count_uses(client: redis.Redis, queue: str, uses: Iterable[dict]) -> None:
    """Count a request's adapter uses (those that ran: `hit` is not None) for its pool."""
    _outage.run(_count, client, queue, uses)  # counters are advisory


def _count(client: redis.Redis, queue: str, uses: Iterable[dict]) -> None:
    for use in uses:
        if use.get("hit") is not None:
            cache_directory.count_adapter(client, queue, bool(use["hit"]), float(use["load_s"]))
