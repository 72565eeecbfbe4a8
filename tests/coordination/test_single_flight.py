"""Single-flight across workers: one caller claims a cache key and computes; the others
wait for its outcome, or take over when it gives up or dies."""

from __future__ import annotations

import threading
import time

import pytest
from helpers import KEYS

from omni_tasks.coordination import single_flight as sf

KEY = "lat:0123456789abcdef"


def test_claim_then_a_second_claim_fails(redis_client) -> None:
    flight = sf.try_claim(redis_client, KEY)
    assert flight is not None
    assert redis_client.get(KEYS.flight_lease(KEY)) == flight.token
    assert 0 < redis_client.pttl(KEYS.flight_lease(KEY)) <= sf.LEASE_S * 1000
    assert sf.try_claim(redis_client, KEY) is None
    assert sf.try_claim(redis_client, KEY + "-other") is not None  # another key is another flight
    flight.release()


def test_publish_gives_the_outcome_and_drops_the_lease(redis_client) -> None:
    flight = sf.try_claim(redis_client, KEY)
    assert sf.outcome(redis_client, KEY) is None
    flight.publish("cached:w1")
    assert sf.outcome(redis_client, KEY) == "cached:w1"
    assert not redis_client.exists(KEYS.flight_lease(KEY))
    assert 0 < redis_client.ttl(KEYS.flight_result(KEY)) <= sf.RESULT_TTL_S
    assert sf.join(redis_client, KEY, time.monotonic() + 1) == (None, "cached:w1")


def test_release_lets_a_waiter_claim(redis_client) -> None:
    flight = sf.try_claim(redis_client, KEY)
    flight.release()
    assert not redis_client.exists(KEYS.flight_lease(KEY))
    assert sf.outcome(redis_client, KEY) is None  # released without an outcome
    mine, done = sf.join(redis_client, KEY, time.monotonic() + 1)
    assert done is None and mine is not None
    assert redis_client.get(KEYS.flight_lease(KEY)) == mine.token
    mine.release()


def test_a_waiter_gets_the_outcome_published_while_it_waits(redis_client) -> None:
    flight = sf.try_claim(redis_client, KEY)
    timer = threading.Timer(0.3, flight.publish, args=("cached:w1",))
    timer.start()
    started = time.monotonic()
    assert sf.join(redis_client, KEY, started + 10) == (None, "cached:w1")
    assert 0.2 < time.monotonic() - started < 5
    timer.join()


def test_a_waiter_takes_over_when_the_holder_gives_up(redis_client) -> None:
    flight = sf.try_claim(redis_client, KEY)
    timer = threading.Timer(0.3, flight.release)
    timer.start()
    mine, done = sf.join(redis_client, KEY, time.monotonic() + 10)
    timer.join()
    assert done is None and mine is not None and mine.token != flight.token
    mine.release()


def test_a_waiter_takes_over_when_the_holder_died(redis_client) -> None:
    redis_client.set(KEYS.flight_lease(KEY), "dead-worker", px=300)  # no renewals come
    mine, done = sf.join(redis_client, KEY, time.monotonic() + 10)
    assert done is None and mine is not None
    mine.release()


def test_join_times_out(redis_client) -> None:
    redis_client.set(KEYS.flight_lease(KEY), "busy-worker", px=60_000)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="waited for the computation"):
        sf.join(redis_client, KEY, started + 0.3)
    assert 0.3 <= time.monotonic() - started < 3
    assert redis_client.get(KEYS.flight_lease(KEY)) == "busy-worker"  # not taken over


def test_the_holder_renews_its_lease_while_it_works(redis_client) -> None:
    flight = sf.try_claim(redis_client, KEY, lease_s=0.3)  # renewed every 0.1 s
    time.sleep(0.8)  # past the lease: only its renewals keep it
    assert redis_client.get(KEYS.flight_lease(KEY)) == flight.token
    flight.publish("done")
    assert not redis_client.exists(KEYS.flight_lease(KEY))
    assert sf.outcome(redis_client, KEY) == "done"


def test_only_the_holder_releases_its_lease(redis_client) -> None:
    flight = sf.try_claim(redis_client, KEY)
    impostor = sf.Flight(redis_client, KEY, token="not-the-holder")
    impostor.release()
    assert redis_client.get(KEYS.flight_lease(KEY)) == flight.token
    impostor.publish("wrong")  # an outcome is kept, but the lease stays with its holder
    assert redis_client.get(KEYS.flight_lease(KEY)) == flight.token
    flight.release()
