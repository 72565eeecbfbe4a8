"""The Redis transport of every broker connection the app opens: kombu's, with one
Redis client kept per channel, and exchange bindings read defensively.

kombu's Redis channel builds a new `redis.Redis` for each command it sends outside the
consuming connection (`conn_or_acquire`): every publish, every event, every ack. On
redis-py 6 that costs about 0.15 ms a time, a quarter of a `.delay()`. The client is a
thin handle on the channel's connection pool and is thread-safe, so one per channel
serves; it is rebuilt when kombu replaces the pool (after a lost connection).

A closed channel (after a lost connection, or any close) never builds a new pool:
kombu would read the connection's parameters from a transport that may be gone and
raise `AttributeError`, which Celery treats as unrecoverable wherever it surfaces (an
ack, a reject, a restore). Such a channel raises `ChannelDetachedError`, a Redis
connection error, instead: every caller handles that as the lost connection it is.

The app selects this transport by name (`TRANSPORT_ALIAS`, through `broker_transport`)
where the broker URL selects kombu's plain Redis transport, and its Sentinel twin
(`SENTINEL_TRANSPORT_ALIAS`, kombu's `SentinelChannel` underneath: every new connection
asks the Sentinels for the master, so the channel follows a failover) where it selects
kombu's Sentinel transport (`sentinel://host:port;sentinel://host:port`); the worker's
consuming connection uses their vetting subclasses (`workers.transport`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis as redis_py
from kombu import Connection
from kombu.transport import TRANSPORT_ALIASES, get_transport_cls, redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps

from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination import acceptance, keys
from omni_tasks.coordination.keyspace import keyspace
from omni_tasks.model_registry import model_queues

log = logging.getLogger(__name__)

#: The routing key of Celery's task-sent event.
TASK_SENT = "task.sent"
#: A kombu binding is routing key, pattern and queue joined by the separator.
BINDING_FIELDS = 3


#: The broker transport option saying what purging the diffusion pool's queue also
#: purges (`purge_options`): the app's connections carry it to their channels.
PURGE_OPTION = "omni_purge_with"


def purge_options(config: CoreModuleConfig) -> dict[str, Any]:
    """The transport option of `config` for `OmniRedisChannel._purge`: the diffusion
    pool's queue, its registered models' queues and the name its workers' own queues
    start with (routing sends work to both)."""
    return {
        PURGE_OPTION: {
            "queue": config.diffusion.queue,
            "models": sorted(model_queues(config).values()),
            "own_prefix": keyspace(config.key_prefix).worker_queue(""),
        }
    }


#: Message property set on every message an omni-tasks process publishes to Redis:
#: a message without it came from another client (`workers.lifecycle.reroute`).
PUBLISHED_PROPERTY = "omni_published"


class ChannelDetachedError(redis_py.ConnectionError):
    """A command on a closed broker channel (its connection lost or closed)."""


class OmniRedisChannel(redis.Channel):
    _kept_client: Any = None
    _detached = False

    @property
    def pool(self) -> Any:
        """kombu's connection pool; rebuilt on demand only while the channel still has
        its transport (a channel closing normally rebuilds it to give its unacked
        messages back)."""
        if self._pool is None:
            self._require_attached()
        return super().pool

    @property
    def async_pool(self) -> Any:
        if self._async_pool is None:
            self._require_attached()
        return super().async_pool

    def close(self) -> None:
        """kombu's close; then no command goes through this channel any more, and the
        pool kombu may have built again to give unacked messages back is let go."""
        try:
            super().close()
        finally:
            self._detached = True
            self._disconnect_pools()

    def _require_attached(self) -> None:
        transport = self.connection
        if self._detached or transport is None or getattr(transport, "client", None) is None:
            raise ChannelDetachedError(f"broker channel {self.channel_id} is closed")

    def prepare_message(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        message = super().prepare_message(*args, **kwargs)
        message["properties"][PUBLISHED_PROPERTY] = True
        return message

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        """kombu's publish of a message to a queue's list; where a send is accepting the
        message's request, the accepting script publishes it in the same step
        (`omni_tasks.coordination.acceptance`)."""
        pending = acceptance.awaiting_publish()
        if pending is None or kwargs.get("_publish_batch") is not None:
            super()._put(queue, message, **kwargs)
            return
        level = self._get_message_priority(message, reverse=False)
        pending.stash((self._q_for_pri(queue, level), dumps(message)))

    def _put_fanout(
        self, exchange: str, message: dict[str, Any], routing_key: str, **kwargs: Any
    ) -> None:
        """kombu's publish of an event; a send's task-sent event rides on the script
        that accepts its request and publishes its message: one round trip per send."""
        pending = acceptance.awaiting_event()
        if pending is None or routing_key != TASK_SENT or kwargs.get("_publish_batch"):
            super()._put_fanout(exchange, message, routing_key, **kwargs)
            return
        payload = dumps(message)
        topics = self._get_publish_topics(exchange, routing_key)
        pending.accept_with_event([(topic, payload) for topic in topics])

    def queue_delete(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        """kombu's; a channel closing after a lost connection deletes its auto-delete
        queues' bindings, and the failure stopped its close half way (pools never
        disconnected, the error logged with pages of traceback). The binding stays
        (a dead worker leaves it the same way)."""
        if not self._closing:
            return super().queue_delete(queue, *args, **kwargs)
        try:
            return super().queue_delete(queue, *args, **kwargs)
        except self.connection_errors as exc:
            log.info("left the binding of %s: %s", queue, " ".join(str(exc).split()))
            return None

    def get_table(self, exchange: str) -> list[tuple[str, ...]]:
        """kombu's exchange bindings, without those another client wrote with another
        separator: kombu would fail to unpack them on every publish to the exchange
        (and a worker would answer no control command)."""
        key = self.keyprefix_queue % exchange
        with self.conn_or_acquire() as client:
            values = client.smembers(key)
        table = [tuple(bytes_to_str(value).split(self.sep)) for value in values]
        return [binding for binding in table if len(binding) == BINDING_FIELDS]

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        kept = self._kept_client
        if kept is None or kept.connection_pool is not self.pool:
            kept = self._kept_client = self._create_client()
        yield kept

    def _purge(self, queue: str) -> int:
        """kombu's purge of every level of `queue`; purging the diffusion pool's queue
        also purges its registered models' queues and its workers' own queues (routing
        sends work there), so `celery purge` leaves no message for a worker started
        later. What they are comes with the connection (`purge_options`)."""
        purged = super()._purge(queue)
        options = self.connection.client.transport_options.get(PURGE_OPTION) or {}
        if queue != options.get("queue"):
            return purged
        with self.conn_or_acquire() as client:
            own = list(client.scan_iter(match=options["own_prefix"] + "*", count=500))
            models = options.get("models", [])
            own += [k for name in models for k in keys.queue_keys(name) if client.exists(k)]
            if own:
                pipe = client.pipeline()
                for key in own:
                    pipe.llen(key)
                pipe.delete(*own)
                purged += sum(pipe.execute()[:-1])
        return purged


class OmniRedisTransport(redis.Transport):
    Channel = OmniRedisChannel


class OmniSentinelChannel(OmniRedisChannel, redis.SentinelChannel):
    """`OmniRedisChannel` on kombu's Sentinel channel: its pools are the master's, as
    the Sentinels name it (`master_name` in the transport options)."""


class OmniSentinelTransport(redis.SentinelTransport):
    Channel = OmniSentinelChannel


#: The names the app selects the transports by: names, not the classes, so a
#: connection's info stays JSON (Flower's worker page, `inspect stats`).
TRANSPORT_ALIAS = "omni-redis-kept"
TRANSPORT_ALIASES.setdefault(TRANSPORT_ALIAS, f"{__name__}:OmniRedisTransport")
SENTINEL_TRANSPORT_ALIAS = "omni-sentinel-kept"
TRANSPORT_ALIASES.setdefault(SENTINEL_TRANSPORT_ALIAS, f"{__name__}:OmniSentinelTransport")


class OmniConnection(Connection):
    """kombu's connection, naming a Redis transport by its URL scheme in `info()` and
    `as_uri()` whichever class serves it: Flower picks its broker client by that scheme,
    and the worker's stats show it."""

    def info(self) -> dict[str, Any]:
        info = super().info()
        name = info.get("transport")
        if isinstance(name, str) and name not in ("redis", "rediss", "sentinel"):
            cls = get_transport_cls(name)
            if issubclass(cls, redis.SentinelTransport):
                info["transport"] = "sentinel"
            elif issubclass(cls, redis.Transport):
                info["transport"] = "rediss" if self.ssl else "redis"
        return info


def accepts_on_publish(config: CoreModuleConfig) -> bool:
    """Whether a send's acceptance rides on its publish (`OmniRedisChannel._put`): the
    broker is `config`'s coordination Redis, reached through this module's transport."""
    return config.broker == config.redis_url and kept_transport(config.broker) is not None


@functools.cache
def is_plain_redis(url: str) -> bool:
    """Whether `url` selects kombu's plain Redis transport (redis://, rediss://)."""
    return get_transport_cls(Connection(url).transport_cls) is redis.Transport


@functools.cache
def is_sentinel(url: str) -> bool:
    """Whether `url` selects kombu's Redis Sentinel transport (sentinel://)."""
    return get_transport_cls(Connection(url).transport_cls) is redis.SentinelTransport


def kept_transport(url: str) -> str | None:
    """The name of this module's transport for `url`: the plain Redis one, the
    Sentinel one, or None (another broker: kombu's own transport serves it)."""
    if is_plain_redis(url):
        return TRANSPORT_ALIAS
    return SENTINEL_TRANSPORT_ALIAS if is_sentinel(url) else None
