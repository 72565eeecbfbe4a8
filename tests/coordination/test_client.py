"""The Redis connection for omni-tasks' own keys: one client per URL (socket URLs in
Celery's spelling too), string replies, and the poll back-off of waiters."""

from __future__ import annotations

import itertools
import ssl
from dataclasses import replace

import pytest
import redis

from omni_tasks import get_config
from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination.client import (
    POLL_GROWTH,
    POLL_MAX_S,
    POLL_MIN_S,
    backoff,
    get_redis,
    redacted,
    to_redis_py_url,
    with_tls_defaults,
)
from omni_tasks.tasks.celery_app import celery_settings


def test_to_redis_py_url() -> None:
    assert to_redis_py_url("redis+socket:///tmp/r.sock") == "unix:///tmp/r.sock"
    assert to_redis_py_url("redis+socket:///tmp/r.sock?db=2") == "unix:///tmp/r.sock?db=2"
    for url in ("redis://127.0.0.1:6379/11", "rediss://h:6380/0", "unix:///tmp/r.sock"):
        assert to_redis_py_url(url) == url


def test_one_client_per_url() -> None:
    client = get_redis()
    assert get_redis() is client
    assert get_redis(get_config().redis_url) is client
    # Creating a client connects nowhere; a URL nothing serves still gets its own client.
    elsewhere = get_redis("redis://127.0.0.1:1/11")
    assert elsewhere is not client and get_redis("redis://127.0.0.1:1/11") is elsewhere
    socket = get_redis("redis+socket:///tmp/omni-test-none.sock")
    assert get_redis("unix:///tmp/omni-test-none.sock") is socket


def test_the_client_answers_with_strings(redis_client) -> None:
    assert redis_client is get_redis()
    assert redis_client.ping() is True
    redis_client.set("omni-test-key", "v")
    assert redis_client.get("omni-test-key") == "v"  # str, not bytes


def test_backoff_grows_by_1_5_and_caps() -> None:
    assert (POLL_MIN_S, POLL_MAX_S, POLL_GROWTH) == (0.01, 0.25, 1.5)
    intervals = list(itertools.islice(backoff(), 20))
    assert intervals[0] == POLL_MIN_S
    for before, after in zip(intervals, intervals[1:], strict=False):
        assert after == pytest.approx(min(before * 1.5, POLL_MAX_S))
    assert intervals[:3] == pytest.approx([0.01, 0.015, 0.0225])
    assert max(intervals) == POLL_MAX_S and intervals[-1] == POLL_MAX_S
    assert intervals.index(POLL_MAX_S) == 8  # 0.01 * 1.5**8 > 0.25 > 0.01 * 1.5**7


def test_backoff_with_its_own_start_cap_and_growth() -> None:
    assert list(itertools.islice(backoff(1.0, 5.0, 2.0), 5)) == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert list(itertools.islice(backoff(0.5, 0.5), 3)) == [0.5, 0.5, 0.5]


def test_rediss_urls_verify_the_certificate_unless_they_say_otherwise() -> None:
    config = replace(CoreModuleConfig(), redis_url="rediss://:pw@cache.example:6380/0")
    settings = celery_settings(config)
    for url in (settings["broker_url"], settings["result_backend"]):
        assert url == "rediss://:pw@cache.example:6380/0?ssl_cert_reqs=required"
    named = "rediss://h:6380/0?ssl_ca_certs=/ca.pem"
    assert with_tls_defaults(named) == named + "&ssl_cert_reqs=required"
    relaxed = "rediss://h:6380/0?ssl_cert_reqs=none"
    assert with_tls_defaults(relaxed) == relaxed  # said otherwise: left as is
    assert with_tls_defaults("redis://h:6379/0") == "redis://h:6379/0"
    # The coordination client (redis-py) reads the same URL the same way.
    pool = redis.Redis.from_url(to_redis_py_url("rediss://:pw@h:6380/0")).connection_pool
    assert pool.connection_class(**pool.connection_kwargs).cert_reqs == ssl.CERT_REQUIRED


def test_redacted_masks_passwords_of_every_broker() -> None:
    assert redacted("redis://:pw@h:6379/0") == "redis://:**@h:6379/0"
    assert redacted("rediss://user:pw@h:6380/1?ssl_cert_reqs=required").startswith(
        "rediss://user:**@h:6380/1"
    )
    assert redacted("amqp://guest:pw@h:5672//") == "amqp://guest:**@h:5672//"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"
