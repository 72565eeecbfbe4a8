"""`Idempotency-Key` on the POST endpoints that enqueue: one key, one call, one run.

A client that retries a POST (after a timeout, a 503, a dropped connection) sends the
same `Idempotency-Key` again. The request ids of a keyed call are a function of the
caller and the key (`CallKey`), so the retry names the requests the first attempt
sent, and the producer's id check (`coordination.idempotency`) publishes nothing
again: the retry gets the first attempt's job and its one result.

- The caller is the bearer token in use, as its SHA-256 (the token itself is never
  kept), or nobody when the API runs without one: two callers with the same key never
  share ids.
- A keyed call's fingerprint (the endpoint, its requests' fingerprints and the options
  that shape the answer) is kept under its id for `result_expires`: the same key with
  another body is 409, before anything is sent (`KeyedCall`).
- A keyed call that failed with nothing accepted gives its key back, so the client may
  send another body under it; one that may have been accepted keeps it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from fastapi import Request

from omni_tasks.api.errors import APIError
from omni_tasks.api.hub import ResultHub
from omni_tasks.errors import BrokerUnavailableError, CoreModuleError, RequestConflictError
from omni_tasks.requests import OmniRequest

HEADER = "Idempotency-Key"
#: The longest key taken (Stripe's bound; the openai client's keys are 58 characters).
MAX_KEY_CHARS = 255
ID_PREFIX = "idem-"
_SALT = "omni-tasks idempotency"
#: Deletes a call's fingerprint only if it is still the one this call recorded.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

Claim = Literal["new", "repeat", "conflict"]


def caller_of(token: str | None) -> str:
    """Who calls, as keys are scoped: the token's SHA-256, or "" without a token."""
    return hashlib.sha256(token.encode()).hexdigest() if token else ""


@dataclass(frozen=True)
class CallKey:
    """The request ids of a call: derived from its key, or None (new ids) without one."""

    base: str | None = None

    def request_id(self, index: int = 0) -> str | None:
        """The id of the call's request `index` (an image call sends one per image)."""
        if self.base is None:
            return None
        return self.base if index == 0 else f"{self.base}-{index}"


def call_key(request: Request) -> CallKey:
    """The call's `CallKey` from its `Idempotency-Key` header (400 when malformed)."""
    given = request.headers.getlist(HEADER)
    if not given:
        return CallKey()
    if len(given) > 1:
        raise bad_key("must be sent once")
    key = given[0].strip()
    if not key or len(key) > MAX_KEY_CHARS:
        raise bad_key(f"must be 1 to {MAX_KEY_CHARS} characters")
    if not all(" " <= ch <= "~" for ch in key):
        raise bad_key("must be printable ASCII")
    return CallKey(keyed_id(getattr(request.app.state, "caller", ""), key))


def keyed_id(caller: str, key: str) -> str:
    """The request id of `caller`'s call under `key` (its first request's)."""
    return ID_PREFIX + hashlib.sha256(f"{_SALT}\0{caller}\0{key}".encode()).hexdigest()


def bad_key(message: str) -> APIError:
    return APIError(400, f"{HEADER}: {message}", param=HEADER, code="invalid_value")


def conflict() -> APIError:
    """409 for a key used before with another body; `x-should-retry: false`, so the
    openai client does not retry it (it retries a 409 by default)."""
    message = (
        f"{HEADER}: this key was used for a different request; send the same request "
        "again to get that call's result, or use a new key"
    )
    return APIError(
        409,
        message,
        param=HEADER,
        code="idempotency_key_reused",
        headers={"x-should-retry": "false"},
    )


def call_fingerprint(endpoint: str, requests: list[OmniRequest], options: Any) -> str:
    """A digest of what a call asks: its endpoint, its requests (without their ids and
    creation times) and the options that shape its answer."""
    data = {
        "endpoint": endpoint,
        "requests": [r.fingerprint() for r in requests],
        "options": options,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def surely_refused(exc: BaseException) -> bool:
    """Whether a failed accept left nothing that could run: a refusal the API or the
    producer raised before anything was accepted. A broken connection that may have
    been accepted, a cancelled call (its send may still complete) or an unexpected
    error are not."""
    if isinstance(exc, BrokerUnavailableError):
        return not exc.may_be_accepted
    return isinstance(exc, (APIError, CoreModuleError))


class KeyedCall:
    """The scope of a call's accept: `async with KeyedCall(...) as call`. Without a key
    it does nothing. With one it claims the key for the call's fingerprint (409 if the
    key holds another), turns the producer's `RequestConflictError` into that same 409,
    and gives the key back if the call failed before anything was accepted (set
    `accepted` once a request was)."""

    def __init__(self, hub: ResultHub, key: CallKey, fingerprint: str, ttl_s: float) -> None:
        """`hub`: the app's (its client and keys); `ttl_s`: how long the key is kept (as
        long as results: `result_expires`)."""
        self.redis = hub.redis
        self.keys = hub.keys
        self.ttl_s = int(ttl_s)
        self.key = key
        self.fingerprint = fingerprint
        self.claim: Claim | None = None
        self.accepted = False

    @property
    def _redis_key(self) -> str:
        return self.keys.api_idempotency(self.key.base)

    async def __aenter__(self) -> KeyedCall:
        if self.key.base is None:
            return self
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self._redis_key, self.fingerprint, nx=True, ex=self.ttl_s)
        pipe.get(self._redis_key)
        created, found = await pipe.execute()
        self.claim = "new" if created else "repeat" if found == self.fingerprint else "conflict"
        if self.claim == "conflict":
            raise conflict()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or self.key.base is None:
            return
        if self.claim == "new" and not self.accepted and surely_refused(exc):
            await asyncio.shield(self.redis.eval(_RELEASE, 1, self._redis_key, self.fingerprint))
        if isinstance(exc, RequestConflictError):
            raise conflict() from exc
