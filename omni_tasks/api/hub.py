"""What the API hears from the workers: result states, progress and previews, with no
polling loop per request.

Celery's Redis result backend PUBLISHes every state it writes (PROGRESS, SUCCESS, ...)
on the channel named like its key; workers announce previews the same way
(`KeySpace.previews`). Each API process keeps one pub/sub connection: a waiter subscribes
to the channels of its request, then reads the current state, then sleeps until a
message comes. Subscriptions are confirmed before that read, so no state written in
between is missed; a slow re-read (`FALLBACK_S`) covers a lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from omni_tasks.coordination.client import (
    CONNECT_TIMEOUT_S,
    async_redis_for_url,
    to_redis_py_url,
)
from omni_tasks.coordination.keyspace import KeySpace

log = logging.getLogger(__name__)

#: The final states of a task in the result backend.
READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED", "REJECTED"})
#: A waiter re-reads the state this often even when no message came (lost connection).
FALLBACK_S = 2.0
#: How long a subscription may take to be confirmed before the waiter reads anyway.
CONFIRM_TIMEOUT_S = 2.0
#: A channel of our own, subscribed for the hub's lifetime (keeps the connection open).
HUB_CHANNEL = "omni-api-hub"


def meta_key(task_id: str) -> str:
    """The result backend's key (and channel) of a task, as Celery names it."""
    return _meta_prefix() + task_id


@functools.cache
def _meta_prefix() -> str:
    from omni_tasks.tasks.celery_app import app

    key = app.backend.get_key_for_task("x")
    text = key.decode() if isinstance(key, bytes) else str(key)
    return text[:-1]


def is_final(meta: dict[str, Any] | None) -> bool:
    return bool(meta) and meta.get("status") in READY_STATES  # type: ignore[union-attr]


class ResultHub:
    """One process's asyncio Redis client and pub/sub connection, and the `KeySpace`
    its app names keys in (`keys`), for what is given the hub."""

    def __init__(self, url: str, keys: KeySpace) -> None:
        self.keys = keys
        self.redis = async_redis_for_url(  # a Sentinel URL's follows a failover
            to_redis_py_url(url),
            decode_responses=True,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            health_check_interval=30,
        )
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._listeners: dict[str, set[asyncio.Queue[tuple[str, str]]]] = {}
        self._subscribed: dict[str, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()
        self._chores: set[asyncio.Task[None]] = set()  # unsubscribes in flight

    async def start(self) -> None:
        self._pubsub = self.redis.pubsub()
        await self._pubsub.subscribe(HUB_CHANNEL)
        self._reader = asyncio.create_task(self._read(), name="omni-api-hub")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        await self.redis.aclose()

    async def meta(self, task_id: str) -> dict[str, Any] | None:
        """The task's state now (None: nothing written yet, PENDING)."""
        return _decode(await self.redis.get(meta_key(task_id)))

    async def metas(self, task_ids: list[str]) -> list[dict[str, Any] | None]:
        raw = await self.redis.mget([meta_key(t) for t in task_ids])
        return [_decode(r) for r in raw]

    @contextlib.asynccontextmanager
    async def listen(self, channels: list[str]) -> AsyncIterator[asyncio.Queue[tuple[str, str]]]:
        """A queue of (channel, data) for what is published on `channels` meanwhile;
        subscribed (and confirmed) when this returns."""
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for channel in channels:
            self._listeners.setdefault(channel, set()).add(queue)
        try:
            await self._subscribe(channels)
            yield queue
        finally:
            for channel in channels:
                found = self._listeners.get(channel)
                if found is not None:
                    found.discard(queue)
                    if not found:
                        del self._listeners[channel]
            chore = asyncio.get_running_loop().create_task(self._unsubscribe(channels))
            self._chores.add(chore)
            chore.add_done_callback(self._chores.discard)

    async def wait(self, task_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The task's final state, or None if it is not final after `timeout_s`."""
        key = meta_key(task_id)
        deadline = time.monotonic() + timeout_s
        async with self.listen([key]) as queue:
            meta = await self.meta(task_id)
            while not is_final(meta):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                message = await next_message(queue, min(remaining, FALLBACK_S))
                meta = _decode(message[1]) if message else await self.meta(task_id)
            return meta

    async def _subscribe(self, channels: list[str]) -> None:
        async with self._lock:
            new = [c for c in channels if c not in self._subscribed]
            loop = asyncio.get_running_loop()
            for channel in new:
                self._subscribed[channel] = loop.create_future()
            if new:
                await self._pubsub.subscribe(*new)
        pending = [self._subscribed[c] for c in channels if c in self._subscribed]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.gather(*pending)), CONFIRM_TIMEOUT_S)

    async def _unsubscribe(self, channels: list[str]) -> None:
        async with self._lock:
            idle = [c for c in channels if c not in self._listeners and c in self._subscribed]
            for channel in idle:
                future = self._subscribed.pop(channel)
                if not future.done():
                    future.cancel()
            if idle:
                with contextlib.suppress(Exception):
                    await self._pubsub.unsubscribe(*idle)

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis went away: redis-py reconnects and resubscribes
                log.warning("result hub: pub/sub read failed; retrying", exc_info=True)
                await asyncio.sleep(0.5)
                continue
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, channel = message.get("type"), message.get("channel")
        if kind == "subscribe":
            future = self._subscribed.get(channel)  # type: ignore[arg-type]
            if future is not None and not future.done():
                future.set_result(None)
        elif kind == "message":
            for queue in list(self._listeners.get(channel, ())):  # type: ignore[arg-type]
                queue.put_nowait((channel, message.get("data")))  # type: ignore[arg-type]


class TaskSet:
    """The background tasks one API object runs: referenced while they run (the event
    loop holds only weak references), cancelled and awaited when it stops."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def sweep_forever(
    sweep: Callable[[], Awaitable[Any]], period_s: float, what: str, logger: logging.Logger
) -> None:
    """Run `sweep` every `period_s` (jittered, so that API processes spread out) until
    cancelled; a failed sweep is logged and tried again next time."""
    while True:
        await asyncio.sleep(period_s * random.uniform(0.5, 1.0))
        try:
            await sweep()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("%s sweep failed; retrying", what, exc_info=True)


async def next_message(
    queue: asyncio.Queue[tuple[str, str]], timeout_s: float
) -> tuple[str, str] | None:
    """The next (channel, data) of `queue`, or None after `timeout_s`."""
    if not queue.empty():
        return queue.get_nowait()
    try:
        return await asyncio.wait_for(queue.get(), timeout_s)
    except asyncio.TimeoutError:
        return None


def _decode(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None
