"""Single-flight across workers: identical requests in flight at the same time compute
once; the others wait (bounded) and reuse the outcome.

The computing worker holds a lease, renewed while it works. It publishes the outcome
under a short-lived key and drops the lease. A waiter polls: outcome there -> reuse it;
lease gone without an outcome (the holder failed, or died and the lease expired) -> it
claims the key and computes itself.

A caller may name its worker (`holder`: the name its heartbeat hash `KeySpace.worker(holder)`
is kept under, a worker's `runtime.hostname`). Its lease then records it, and a waiter
that finds the holder's heartbeat gone (expired: the worker is dead, as the reaper
judges it) takes the lease over at once and computes, instead of waiting up to
`LEASE_S` for a killed worker's lease to lapse. A lease that names no one (a caller
outside a worker) is freed by its expiry alone. A holder whose heartbeat lapses while it
is alive (Redis away for longer than the heartbeat's TTL) may compute beside its
successor: both publish the same outcome, nothing is lost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis

from omni_tasks.coordination.client import OmniRedis, backoff

LEASE_S = 30.0  # an unnamed dead holder blocks waiters at most this long
RESULT_TTL_S = 300  # outcomes serve waiters, not later repeats (the caches do that)
POLL_MAX_S = 0.2
_SEP = "|"  # a lease's value: `token`, or `token|holder` (the token is hex)

log = logging.getLogger(__name__)


@dataclass
class Flight:
    """A held lease on `cache_key` in `client`'s Redis; renews itself until published or
    released."""

    client: OmniRedis
    cache_key: str
    token: str
    lease_s: float = LEASE_S
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def start_renewing(self) -> None:
        threading.Thread(target=self._renew_loop, name="omni-flight", daemon=True).start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.client.scripts.flight_renew(
                    keys=[self.client.keyspace.flight_lease(self.cache_key)],
                    args=[self.token, int(self.lease_s * 1000)],
                )
            except Exception:  # a missed renewal only shortens the lease
                pass

    def publish(self, outcome: str) -> None:
        self._stop.set()
        self.client.scripts.flight_publish(
            keys=[
                self.client.keyspace.flight_lease(self.cache_key),
                self.client.keyspace.flight_result(self.cache_key),
            ],
            args=[self.token, outcome, RESULT_TTL_S],
        )

    def release(self) -> None:
        self._stop.set()
        self.client.scripts.release_held(
            keys=[self.client.keyspace.flight_lease(self.cache_key)], args=[self.token]
        )


def try_claim(
    client: OmniRedis, cache_key: str, lease_s: float = LEASE_S, holder: str | None = None
) -> Flight | None:
    """Hold `cache_key`'s lease if it is free (`SET NX PX`), else None.

    `holder`: the caller's worker name, recorded in the lease (see `join`).
    """
    value = _lease_value(holder)
    if client.set(client.keyspace.flight_lease(cache_key), value, nx=True, px=int(lease_s * 1000)):
        return _flying(client, cache_key, value, lease_s)
    return None


def holder_of(lease_value: str) -> str | None:
    """The worker a lease's value names, if any."""
    _, sep, holder = lease_value.partition(_SEP)
    return holder if sep and holder else None


def outcome(client: OmniRedis, cache_key: str) -> str | None:
    return client.get(client.keyspace.flight_result(cache_key))


def join(
    client: OmniRedis, cache_key: str, deadline: float, holder: str | None = None
) -> tuple[Flight | None, str | None]:
    """Claim `cache_key` or wait for the flight that holds it.

    `client`: the caller's Redis client (a worker's `runtime.redis`). Returns
    (flight, None) when this caller must compute (and then publish or
    release), or (None, outcome) when another worker's outcome can be reused.
    Raises TimeoutError at `deadline` (time.monotonic()).

    `holder`: the caller's worker name, whose heartbeat hash is `KeySpace.worker(holder)` (a
    worker's `runtime.hostname`; pass it only from a process whose worker beats). The
    lease it takes names it, so that if this worker is killed, its waiters and the
    redelivered message take the flight over as soon as its heartbeat expires. Without
    it, only the lease's expiry (`LEASE_S`) frees a dead caller's flight. Any waiter
    takes over a lease whose named holder's heartbeat is gone.

    Each poll while waiting reads the outcome and the lease in one round trip, and, if
    the lease names a holder, checks its heartbeat (one EXISTS).
    """
    for poll, interval in enumerate(backoff(cap=POLL_MAX_S)):
        if poll == 0:  # most joins find the key free: try SET NX before reading the lease
            done, held = outcome(client, cache_key), None
        else:
            done, held = _outcome_and_lease(client, cache_key)
        if done is not None:
            return None, done
        if held is None:
            flight = try_claim(client, cache_key, holder=holder)
        else:
            flight = _take_over_if_dead(client, cache_key, held, holder)
        if flight is not None:
            try:
                done = outcome(client, cache_key)  # published between our two reads: reuse it
            except BaseException:
                # Redis went away (a restart, a failover): a flight never handed to
                # the caller would renew its lease for ever, and block every waiter.
                with contextlib.suppress(redis.RedisError):
                    flight.release()
                raise
            if done is not None:
                flight.release()
                return None, done
            return flight, None
        if time.monotonic() >= deadline:
            raise TimeoutError(f"waited for the computation of {cache_key[:12]}...")
        time.sleep(interval)


def _lease_value(holder: str | None) -> str:
    token = uuid.uuid4().hex
    return f"{token}{_SEP}{holder}" if holder else token


def _flying(client: OmniRedis, cache_key: str, value: str, lease_s: float) -> Flight:
    flight = Flight(client, cache_key, value, lease_s)
    flight.start_renewing()
    return flight


def _outcome_and_lease(client: OmniRedis, cache_key: str) -> tuple[str | None, str | None]:
    pipe = client.pipeline(transaction=False)
    pipe.get(client.keyspace.flight_result(cache_key))
    pipe.get(client.keyspace.flight_lease(cache_key))
    done, held = pipe.execute()
    return done, held


def _take_over_if_dead(
    client: OmniRedis, cache_key: str, held: str, holder: str | None
) -> Flight | None:
    """The lease, if it still holds `held` and the worker that names is dead (its
    heartbeat hash expired, as the reaper judges a worker dead); else None.

    Atomic (WATCH on the lease and the heartbeat): of waiters racing for one dead lease,
    one takes it; a lease that changed, or a heartbeat that came back, is left alone.
    """
    dead = holder_of(held)
    if dead is None or client.exists(client.keyspace.worker(dead)):
        return None  # a live holder, or one that names no one (only expiry frees it)
    lease = client.keyspace.flight_lease(cache_key)
    value = _lease_value(holder)
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(lease, client.keyspace.worker(dead))
            if pipe.get(lease) != held or pipe.exists(client.keyspace.worker(dead)):
                return None
            pipe.multi()
            pipe.set(lease, value, px=int(LEASE_S * 1000))
            pipe.execute()
        except redis.WatchError:
            return None  # another waiter took it first (or the holder beat again)
    log.warning("took over the flight of %s...: its holder %s is dead", cache_key[:12], dead)
    return _flying(client, cache_key, value, LEASE_S)
