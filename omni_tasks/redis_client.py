"""One Redis client per process for omni-tasks' own keys (Celery keeps its own pools)."""

from __future__ import annotations

import threading

import redis

from omni_tasks.config import get_config

_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}


def to_redis_py_url(url: str) -> str:
    """Celery spells sockets `redis+socket://path`; redis-py wants `unix://path`."""
    if url.startswith("redis+socket://"):
        return "unix://" + url[len("redis+socket://") :]
    return url


def get_redis(url: str | None = None) -> redis.Redis:
    url = to_redis_py_url(url or get_config().redis_url)
    with _lock:
        client = _clients.get(url)
        if client is None:
            client = redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)
            _clients[url] = client
        return client
