"""The Redis connection of this process for omni-tasks' own keys (Celery keeps its own
pools), with the Lua scripts registered on it, and the polling cadence of waiters."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from omni_tasks.config import get_config
from omni_tasks.coordination.lua import Scripts

POLL_MIN_S, POLL_MAX_S, POLL_GROWTH = 0.01, 0.25, 1.5


@dataclass(frozen=True)
class _Connection:
    client: redis.Redis
    scripts: Scripts


class _Connections:
    """One client (and its registered scripts) per URL, shared by the process's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_url: dict[str, _Connection] = {}

    def get(self, url: str) -> _Connection:
        with self._lock:
            found = self._by_url.get(url)
            if found is None:
                client = redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)
                found = _Connection(client, Scripts(client))
                self._by_url[url] = found
            return found


_connections = _Connections()


def to_redis_py_url(url: str) -> str:
    """Celery spells sockets `redis+socket://path`; redis-py wants `unix://path`."""
    if url.startswith("redis+socket://"):
        return "unix://" + url[len("redis+socket://") :]
    return url


def get_redis(url: str | None = None) -> redis.Redis:
    """The client for `url` (default: the configured `redis_url`)."""
    return _connection(url).client


def get_scripts(url: str | None = None) -> Scripts:
    """The Lua scripts, registered on `get_redis(url)`."""
    return _connection(url).scripts


def _connection(url: str | None) -> _Connection:
    return _connections.get(to_redis_py_url(url or get_config().redis_url))


def backoff(
    start: float = POLL_MIN_S, cap: float = POLL_MAX_S, growth: float = POLL_GROWTH
) -> Iterator[float]:
    """Sleep intervals for a poll loop: short at first (most waits end fast), then capped."""
    interval = start
    while True:
        yield interval
        interval = min(interval * growth, cap)
