"""The Redis connection of this process for omni-tasks' own keys (Celery keeps its own
pools): an `OmniRedis` that carries the key prefix it works under and the Lua scripts
registered on it; the polling cadence of waiters; and the URL rules every Redis client of
omni-tasks shares (TLS defaults, redaction, Sentinel).

A `sentinel://host:port;sentinel://host:port[/db]` URL (kombu's spelling) gives a client
of the master that the Sentinels name (`redis_sentinel_master`): each new connection
asks them where the master is, so every connection follows a failover.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from kombu.utils.url import maybe_sanitize_url

from omni_tasks.config import CoreModuleConfig, get_config
from omni_tasks.config.schema import is_sentinel_url
from omni_tasks.coordination.keyspace import KeySpace, keyspace
from omni_tasks.coordination.lua import Scripts

POLL_MIN_S, POLL_MAX_S, POLL_GROWTH = 0.01, 0.25, 1.5


#: A Redis that does not answer fails a call after this, never hangs it (a producer's
#: `.delay()` then raises `SchedulerError`).
CONNECT_TIMEOUT_S = 5.0


class OmniRedis(redis.Redis):
    """A client of omni-tasks' Redis that carries what naming and scripting its keys
    needs: the `KeySpace` of the config it was made for and the Lua scripts registered on
    it (as arq's `ArqRedis` carries its queue settings). Code given the client names its
    keys as `client.keyspace.<name>(...)`, with no config of its own."""

    def __init__(self, *args: Any, keyspace: KeySpace, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keyspace = keyspace
        self.scripts = Scripts(self)


class _Connections:
    """One connection pool per URL, shared by the process's threads and by its clients
    of each key prefix; and which URLs have answered since their last failure
    (`check_reachable`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[str, redis.ConnectionPool] = {}
        self._clients: dict[tuple[str, str], OmniRedis] = {}
        self._answered: set[str] = set()

    def check_reachable(self, url: str) -> None:
        """PING `url` unless it answered since it last failed; raises RedisError."""
        if url in self._answered:
            return
        redis.Redis(connection_pool=self._pool(url)).ping()
        self._answered.add(url)

    def failed(self, url: str) -> None:
        self._answered.discard(url)

    def get(self, url: str, key_prefix: str) -> OmniRedis:
        pool = self._pool(url)
        with self._lock:
            found = self._clients.get((url, key_prefix))
            if found is None:
                found = OmniRedis(connection_pool=pool, keyspace=keyspace(key_prefix))
                self._clients[(url, key_prefix)] = found
            return found

    def _pool(self, url: str) -> redis.ConnectionPool:
        with self._lock:
            found = self._pools.get(url)
            if found is None:
                found = pool_for_url(
                    url,
                    decode_responses=True,
                    health_check_interval=30,
                    socket_connect_timeout=CONNECT_TIMEOUT_S,
                )
                self._pools[url] = found
            return found


_connections = _Connections()


@dataclass(frozen=True)
class SentinelParams:
    """What a `sentinel://` URL says: the Sentinels, and the master's db and credentials
    (taken from its first part, as Celery's result backend reads them)."""

    sentinels: list[tuple[str, int]]
    master_kwargs: dict[str, Any]


def sentinel_params(url: str) -> SentinelParams:
    """The Sentinels (host, port) and the master's db/username/password of `url`."""
    sentinels: list[tuple[str, int]] = []
    master_kwargs: dict[str, Any] = {}
    for i, part in enumerate(url.split(";")):
        split = urlsplit(part)
        sentinels.append((split.hostname or "127.0.0.1", split.port or SENTINEL_PORT))
        if i:
            continue
        db = split.path.strip("/")
        master_kwargs["db"] = int(db) if db.isdigit() else 0
        if split.username:
            master_kwargs["username"] = unquote(split.username)
        if split.password:
            master_kwargs["password"] = unquote(split.password)
    return SentinelParams(sentinels, master_kwargs)


#: The Sentinel's port where a URL names none.
SENTINEL_PORT = 26379


def redis_for_url(url: str, master: str | None = None, **kwargs: Any) -> redis.Redis:
    """A client of `url` (redis-py's spelling): for a Sentinel URL, of the master the
    Sentinels name (`master`, default `redis_sentinel_master`), found again on every
    new connection, so the client follows a failover."""
    client = redis.Redis(connection_pool=pool_for_url(url, master, **kwargs))
    client.auto_close_connection_pool = True  # as `from_url`: the pool is the client's
    return client


def pool_for_url(url: str, master: str | None = None, **kwargs: Any) -> redis.ConnectionPool:
    """The connection pool of `redis_for_url`."""
    if not is_sentinel_url(url):
        return redis.ConnectionPool.from_url(url, **kwargs)
    params = sentinel_params(url)
    sentinel = redis.sentinel.Sentinel(params.sentinels, **kwargs)
    name = master or get_config().redis_sentinel_master
    return redis.sentinel.SentinelConnectionPool(
        name, sentinel, is_master=True, **{**kwargs, **params.master_kwargs}
    )


def async_redis_for_url(url: str, master: str | None = None, **kwargs: Any) -> Any:
    """`redis_for_url`'s asyncio twin (`redis.asyncio`), for the HTTP API."""
    if not is_sentinel_url(url):
        return redis.asyncio.Redis.from_url(url, **kwargs)
    params = sentinel_params(url)
    sentinel = redis.asyncio.sentinel.Sentinel(params.sentinels, **kwargs)
    name = master or get_config().redis_sentinel_master
    return sentinel.master_for(name, redis_class=redis.asyncio.Redis, **params.master_kwargs)


def to_redis_py_url(url: str) -> str:
    """Celery spells sockets `redis+socket://path`; redis-py wants `unix://path`."""
    if url.startswith("redis+socket://"):
        return "unix://" + url[len("redis+socket://") :]
    return url  # rediss://: redis-py verifies the certificate unless the URL says not to


def with_tls_defaults(url: str) -> str:
    """A `rediss://` URL for Celery that verifies the server's certificate unless it
    says otherwise.

    Without `ssl_cert_reqs`, kombu would connect unverified and Celery's result backend
    would refuse the URL, while redis-py (the coordination client) verifies: adding
    `ssl_cert_reqs=required` makes all three verify, against `ssl_ca_certs` if named.
    """
    if not url.startswith("rediss://"):
        return url
    if "ssl_cert_reqs" in dict(parse_qsl(urlsplit(url).query)):
        return url
    return url + ("&" if "?" in url else "?") + "ssl_cert_reqs=required"


def redacted(url: str) -> str:
    """`url` with its password masked: the form logs, status and errors may show (each
    part of a Sentinel URL)."""
    if not is_sentinel_url(url):
        return str(maybe_sanitize_url(url))
    return ";".join(str(maybe_sanitize_url(part)) for part in url.split(";"))


def get_redis(url: str | None = None, key_prefix: str | None = None) -> OmniRedis:
    """The process's client of `url` naming keys under `key_prefix`, each defaulting to
    the process config's (for entry points; code holding a config uses `client_for`)."""
    if url is None or key_prefix is None:
        config = get_config()
        url = config.redis_url if url is None else url
        key_prefix = config.key_prefix if key_prefix is None else key_prefix
    return _connections.get(to_redis_py_url(url), key_prefix)


def client_for(config: CoreModuleConfig) -> OmniRedis:
    """The process's client of `config`'s Redis, naming keys under its `key_prefix`."""
    return get_redis(config.redis_url, config.key_prefix)


def check_reachable(url: str) -> None:
    """Make sure Redis answers before a step whose own retries would make an absent Redis
    cost minutes (Celery's publish): a PING the first time, and again after `failed`;
    raises RedisError within the connect timeout."""
    _connections.check_reachable(to_redis_py_url(url))


def failed(url: str) -> None:
    """Redis was found unreachable: the next `check_reachable` PINGs again."""
    _connections.failed(to_redis_py_url(url))


def backoff(
    start: float = POLL_MIN_S, cap: float = POLL_MAX_S, growth: float = POLL_GROWTH
) -> Iterator[float]:
    """Sleep intervals for a poll loop: short at first (most waits end fast), then capped."""
    interval = start
    while True:
        yield interval
        interval = min(interval * growth, cap)
