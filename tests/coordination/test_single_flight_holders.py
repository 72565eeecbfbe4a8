"""Single-flight leases that name their holder: a waiter takes over at once the lease of
a worker whose heartbeat is gone (a killed worker), instead of waiting for the lease to
lapse; a live holder is waited on and serves its waiters."""

from __future__ import annotations

import threading
import time

import pytest
from helpers import KEYS, eventually

from omni_tasks.coordination import single_flight as sf
from workers.lifecycle.heartbeat import HEARTBEAT_TTL_S

KEY = "lat:holders0123456789"


def beat(client, hostname: str, ttl_ms: int = HEARTBEAT_TTL_S * 1000) -> None:
    """What a worker's heartbeat writes: its hash under `keys.worker`, expiring."""
    client.hset(KEYS.worker(hostname), mapping={"hostname": hostname, "beat": time.time()})
    client.pexpire(KEYS.worker(hostname), ttl_ms)


def test_a_holder_is_named_in_its_lease(redis_client) -> None:
    beat(redis_client, "w-holder")
    flight = sf.try_claim(redis_client, KEY, holder="w-holder")
    assert flight is not None
    value = redis_client.get(KEYS.flight_lease(KEY))
    assert value == flight.token and sf.holder_of(value) == "w-holder"
    assert 0 < redis_client.pttl(KEYS.flight_lease(KEY)) <= sf.LEASE_S * 1000
    assert sf.try_claim(redis_client, KEY, holder="w-other") is None
    flight.release()
    assert not redis_client.exists(KEYS.flight_lease(KEY))
    unnamed = sf.try_claim(redis_client, KEY)
    assert unnamed is not None and sf.holder_of(unnamed.token) is None
    unnamed.release()


def test_a_lease_that_names_no_holder_is_waited_on_until_it_expires(redis_client) -> None:
    # A holder that named no worker died right after claiming: no one renews its lease.
    redis_client.set(KEYS.flight_lease(KEY), "0" * 32, px=600)
    beat(redis_client, "w-waiter")
    started = time.monotonic()
    mine, done = sf.join(redis_client, KEY, started + 10, holder="w-waiter")
    assert done is None and mine is not None
    assert time.monotonic() - started >= 0.3  # not taken over: its expiry freed it
    assert sf.holder_of(mine.token) == "w-waiter"
    mine.release()


def test_a_lease_whose_holder_beats_is_waited_on(redis_client) -> None:
    beat(redis_client, "w-live")
    beat(redis_client, "w-waiter")
    flight = sf.try_claim(redis_client, KEY, holder="w-live")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="waited for the computation"):
        sf.join(redis_client, KEY, started + 0.5, holder="w-waiter")
    assert time.monotonic() - started >= 0.5
    assert redis_client.get(KEYS.flight_lease(KEY)) == flight.token  # not taken over
    flight.release()


def test_a_waiter_takes_over_at_once_when_the_holders_heartbeat_is_gone(redis_client) -> None:
    beat(redis_client, "w-killed", ttl_ms=300)  # its last beat: the key expires soon
    beat(redis_client, "w-waiter")
    killed = sf.try_claim(redis_client, KEY, holder="w-killed")
    assert sf.holder_of(killed.token) == "w-killed"
    # Killed: no more beats, its heartbeat key expires.
    assert eventually(lambda: not redis_client.exists(KEYS.worker("w-killed")), 5)
    assert redis_client.pttl(KEYS.flight_lease(KEY)) > (sf.LEASE_S - 2) * 1000  # still held
    started = time.monotonic()
    mine, done = sf.join(redis_client, KEY, started + 10, holder="w-waiter")
    waited = time.monotonic() - started
    assert done is None and mine is not None
    assert waited < 1.0  # at once, not after the lease's 30 s
    value = redis_client.get(KEYS.flight_lease(KEY))
    assert value == mine.token != killed.token and sf.holder_of(value) == "w-waiter"
    killed.release()  # the dead holder's lease is no longer its to give back
    assert redis_client.get(KEYS.flight_lease(KEY)) == mine.token
    mine.publish("cached:w-waiter")
    assert sf.outcome(redis_client, KEY) == "cached:w-waiter"
    assert not redis_client.exists(KEYS.flight_lease(KEY))


def test_a_holder_that_publishes_serves_its_waiters(redis_client) -> None:
    beat(redis_client, "w-live")
    flight = sf.try_claim(redis_client, KEY, holder="w-live")
    waiters = [f"w-waiter-{i}" for i in range(3)]
    for name in waiters:
        beat(redis_client, name)
    results: dict[str, tuple] = {}

    def wait(name: str) -> None:
        results[name] = sf.join(redis_client, KEY, time.monotonic() + 10, holder=name)

    threads = [threading.Thread(target=wait, args=(n,)) for n in waiters]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the waiters start polling; one that joins after the publish reads it
    flight.publish("cached:w-live")
    for t in threads:
        t.join(10)
    assert results == {n: (None, "cached:w-live") for n in waiters}
    assert not redis_client.exists(KEYS.flight_lease(KEY))


@pytest.mark.parametrize("round_", range(5))
def test_waiters_racing_a_dead_lease_compute_once(redis_client, round_) -> None:
    # A killed worker's lease: it names a holder whose heartbeat has expired.
    redis_client.set(KEYS.flight_lease(KEY), "0" * 32 + "|w-killed", px=30_000)
    waiters = [f"w-waiter-{i}" for i in range(6)]
    for name in waiters:
        beat(redis_client, name)
    barrier = threading.Barrier(len(waiters))
    results: dict[str, tuple] = {}

    def race(name: str) -> None:
        barrier.wait()
        results[name] = sf.join(redis_client, KEY, time.monotonic() + 10, holder=name)

    threads = [threading.Thread(target=race, args=(n,)) for n in waiters]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while sf.holder_of(redis_client.get(KEYS.flight_lease(KEY)) or "") == "w-killed":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert eventually(lambda: results, 5)  # the winner's join has returned its flight
    winners = [n for n, (flight, _) in results.items() if flight is not None]
    assert len(winners) == 1, results
    (winner,) = winners
    flight = results[winner][0]
    assert redis_client.get(KEYS.flight_lease(KEY)) == flight.token
    assert sf.holder_of(flight.token) == winner
    flight.publish(f"cached:{winner}")
    for t in threads:
        t.join(10)
    assert len(results) == len(waiters)
    others = {n: r for n, r in results.items() if n != winner}
    assert others == {n: (None, f"cached:{winner}") for n in others}
