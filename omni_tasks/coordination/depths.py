"""Queue depths: how many messages wait, per pool, per model and per priority level.

A pool's figure is everything waiting for its workers: its own queue, and for the
diffusion pool its models' queues (`keys.model_queue`, one per registered model) and
its workers' own queues (cache-affinity routing puts work there). Each registered
model's queue is also counted on its own, so a model that no live worker serves shows
what waits for it.

With a RabbitMQ broker the queues are not Redis lists: their depths come from
RabbitMQ (a passive declare), as one count per queue under `UNKNOWN_LEVEL`, since it
does not say at which priorities messages wait.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kombu import Connection

from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination import keys, worker_index
from omni_tasks.coordination.client import OmniRedis, redacted
from omni_tasks.model_registry import model_queues

log = logging.getLogger(__name__)
#: The level under which a queue's count is reported when the broker gives no levels.
UNKNOWN_LEVEL = -1
#: Messages per priority level, by pool queue or by model.
Depths = dict[str, dict[int, int]]


def queue_depths(client: OmniRedis, config: CoreModuleConfig) -> Depths:
    """Messages waiting per pool and priority level (0 highest): see the module docstring."""
    return all_depths(client, config)[0]


def model_depths(client: OmniRedis, config: CoreModuleConfig) -> Depths:
    """Messages waiting per registered diffusion model (its queue) and priority level."""
    return all_depths(client, config)[1]


def all_depths(
    client: OmniRedis, config: CoreModuleConfig, index: worker_index.Index | None = None
) -> tuple[Depths, Depths]:
    """(per pool, per registered model) depths under `config`, read with `client` (the
    coordination Redis) together; the diffusion workers' own queues from `index` when
    the worker index was read already."""
    if not config.broker_is_redis:
        return _broker_depths(config, client, index)
    dit = config.diffusion.queue
    named = model_queues(config)
    counts = _level_counts(client, [*config.pool_queues(), *named.values()])
    models = {model: counts[queue] for model, queue in named.items()}
    pool = dict(counts[dit])
    for levels in models.values():
        for level, count in levels.items():
            pool[level] += count
    own = worker_index.own_queue_keys(client, index)
    pipe = client.pipeline(transaction=False)
    for key, _, _ in own:
        pipe.llen(key)
    for (_, _, level), count in zip(own, pipe.execute() if own else [], strict=True):
        pool[level] += int(count)
    return {q: pool if q == dit else counts[q] for q in config.pool_queues()}, models


def highest_waiting_level(
    client: OmniRedis, config: CoreModuleConfig, queues: list[str]
) -> int | None:
    """The highest priority (lowest level, 0..9) with a message waiting in any of
    `queues`, or None when they are all empty: one round trip. None as well with a
    RabbitMQ broker, which tells how many messages wait but not at which priority."""
    if not config.broker_is_redis:
        return None
    depths = _level_counts(client, queues)
    waiting = [level for levels in depths.values() for level, n in levels.items() if n]
    return min(waiting) if waiting else None


def waiting_above(
    client: OmniRedis, config: CoreModuleConfig, queues: list[str], level: int
) -> bool:
    """Whether a message of a better priority level than `level` (0 highest) waits in
    any of `queues`: one EXISTS over those levels' lists (kombu deletes an empty list),
    so one command however many lists and messages. False with a RabbitMQ broker."""
    if not config.broker_is_redis or level <= 0:
        return False
    lists = [keys.queue_key(q, better) for q in queues for better in range(level)]
    return bool(client.exists(*lists))


def total_queued(client: OmniRedis, config: CoreModuleConfig) -> int:
    """Messages waiting in every queue, all levels."""
    return sum(sum(levels.values()) for levels in queue_depths(client, config).values())


def _level_counts(client: Any, queues: list[str]) -> Depths:
    """Messages per priority level of each queue, read in one pipeline."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for key in keys.queue_keys(queue):
            pipe.llen(key)
    counts = iter(pipe.execute())
    return {q: {level: int(next(counts)) for level in keys.PRIORITY_STEPS} for q in queues}


class _BrokerQueues:
    """One connection to a non-Redis broker, shared by the process's threads, to count
    the messages waiting in its queues."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        self._url = ""

    def counts(self, url: str, queues: list[str]) -> dict[str, int | None]:
        """Messages per queue: 0 for a queue never declared, None when unreachable."""
        with self._lock:
            try:
                if self._connection is None or self._url != url:
                    self._close()
                    self._connection, self._url = Connection(url, connect_timeout=3), url
                connection = self._connection.ensure_connection(max_retries=1)
                return {q: self._count(connection, q) for q in queues}
            except Exception as exc:
                log.warning("cannot count queued messages at %s: %s", redacted(url), exc)
                self._close()
                return dict.fromkeys(queues)

    @staticmethod
    def _count(connection: Connection, queue: str) -> int:
        channel = connection.channel()
        try:
            return int(channel.queue_declare(queue, passive=True).message_count)
        except connection.channel_errors:  # not declared: nothing was ever sent to it
            return 0
        finally:
            try:
                channel.close()
            except Exception:  # the broker closes a channel whose passive declare failed
                pass

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.release()
            self._connection = None


_broker_queues = _BrokerQueues()


def _broker_depths(
    config: CoreModuleConfig, client: OmniRedis, index: worker_index.Index | None
) -> tuple[Depths, Depths]:
    """Depths from a non-Redis broker, one count per queue under `UNKNOWN_LEVEL` (an
    unreachable broker gives empty levels: unknown)."""
    dit = config.diffusion.queue
    kinds = [worker_index.DIT]
    live = worker_index.live(client, kinds) if index is None else worker_index.live_in(index, kinds)
    own = [client.keyspace.worker_queue(w) for w in live]
    named = model_queues(config)
    pool_queues = config.pool_queues()
    counts = _broker_queues.counts(config.broker, [*pool_queues, *named.values(), *own])

    def summed(queues: list[str]) -> dict[int, int]:
        found = [counts[q] for q in queues if counts[q] is not None]
        return {UNKNOWN_LEVEL: sum(found)} if found else {}  # type: ignore[misc]

    pools = {q: summed([q, *named.values(), *own] if q == dit else [q]) for q in pool_queues}
    return pools, {model: summed([queue]) for model, queue in named.items()}
