"""Single-flight across workers: identical requests in flight at the same time compute
once; the others wait (bounded) and reuse the outcome.

The computing worker holds a lease (`SET NX PX`), renewed while it works. It publishes
the outcome under a short-lived key and drops the lease. A waiter polls: outcome there
-> reuse it; lease gone without an outcome (the holder failed or died and the lease
expired) -> it claims the key and computes itself.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

from omni_tasks.coordination import keys
from omni_tasks.coordination.client import backoff, get_redis, get_scripts

LEASE_S = 30.0  # a dead holder blocks waiters at most this long
RESULT_TTL_S = 300  # outcomes serve waiters, not later repeats (the caches do that)
POLL_MAX_S = 0.2


@dataclass
class Flight:
    """A held lease on `cache_key`; renews itself until published or released."""

    cache_key: str
    token: str
    lease_s: float = LEASE_S
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def start_renewing(self) -> None:
        threading.Thread(target=self._renew_loop, name="omni-flight", daemon=True).start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                get_scripts().flight_renew(
                    keys=[keys.flight_lease(self.cache_key)],
                    args=[self.token, int(self.lease_s * 1000)],
                )
            except Exception:  # a missed renewal only shortens the lease
                pass

    def publish(self, outcome: str) -> None:
        self._stop.set()
        get_scripts().flight_publish(
            keys=[keys.flight_lease(self.cache_key), keys.flight_result(self.cache_key)],
            args=[self.token, outcome, RESULT_TTL_S],
        )

    def release(self) -> None:
        self._stop.set()
        get_scripts().release_held(keys=[keys.flight_lease(self.cache_key)], args=[self.token])


def try_claim(cache_key: str, lease_s: float = LEASE_S) -> Flight | None:
    token = uuid.uuid4().hex
    if get_redis().set(keys.flight_lease(cache_key), token, nx=True, px=int(lease_s * 1000)):
        flight = Flight(cache_key, token, lease_s)
        flight.start_renewing()
        return flight
    return None


def outcome(cache_key: str) -> str | None:
    return get_redis().get(keys.flight_result(cache_key))


def join(cache_key: str, deadline: float) -> tuple[Flight | None, str | None]:
    """Claim `cache_key` or wait for the flight that holds it.

    Returns (flight, None) when this caller must compute (and then publish or
    release), or (None, outcome) when another worker's outcome can be reused.
    Raises TimeoutError at `deadline` (time.monotonic()).
    """
    for interval in backoff(cap=POLL_MAX_S):
        done = outcome(cache_key)
        if done is not None:
            return None, done
        flight = try_claim(cache_key)
        if flight is not None:
            done = outcome(cache_key)  # published between our two reads: reuse it
            if done is not None:
                flight.release()
                return None, done
            return flight, None
        if time.monotonic() >= deadline:
            raise TimeoutError(f"waited for the computation of {cache_key[:12]}...")
        time.sleep(interval)
