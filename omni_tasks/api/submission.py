"""Accepting a request over HTTP: an image or multimodal request's diffusion model must
be registered (else 400, param `model`), a live worker must serve each pool it needs
(else 503), a text request's model must be one the AR workers serve (else 404), its
priority comes from the body or the `X-Priority` header; then the producer's own
`submit` enqueues it (admission, the ledger, routing), so a request sent over HTTP is
the same message `.delay()` sends. A registered diffusion model no live worker serves
is accepted: its request waits in the model's queue, as a queued request does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from omni_tasks.api.errors import APIError
from omni_tasks.api.hub import ResultHub
from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination import worker_index
from omni_tasks.model_registry import check_model
from omni_tasks.requests import OmniRequest, RequestType, Stage, stages_of
from omni_tasks.tasks.definitions import probe
from omni_tasks.tasks.producer import cancel, submit

#: How long one read of the heartbeats serves this process.
WORKERS_TTL_S = 2.0
POOL_NAMES = {"ar": "AR (text)", "dit": "diffusion", "tts": "speech"}
PRIORITIES = ("high", "normal", "low")
#: The job type that runs no engine: the queue path alone, end to end.
PROBE = "probe"


class LiveWorkers:
    """The live workers as the worker index and their heartbeats describe them, each
    view read at most once per `WORKERS_TTL_S` however many requests ask. Accepting a
    request costs one ZCOUNT per pool it needs (a text request also reads the AR
    workers' heartbeats, for their models), not a read of every worker."""

    def __init__(self, hub: ResultHub, config: CoreModuleConfig) -> None:
        """`config`: the app's (its pools, the heartbeat timeout, the models it
        registers)."""
        self._hub = hub
        self._keys = hub.keys
        self.config = config
        self._views: dict[Any, tuple[float, Any]] = {}
        self._lock = asyncio.Lock()

    async def all(self) -> list[dict[str, Any]]:
        """The heartbeats of every live worker."""
        return await self._view(worker_index.KINDS, lambda: self._read(worker_index.KINDS))

    async def serving(self, stage: Stage) -> list[dict[str, Any]]:
        """The heartbeats of the live workers running `stage`."""
        return await self._view((stage,), lambda: self._read((stage,)))

    async def count(self, stage: Stage) -> int:
        """How many live workers run `stage` (one ZCOUNT)."""
        key = self._keys.worker_beats(stage)
        return await self._view(
            stage, lambda: self._hub.redis.zcount(key, *worker_index.live_window())
        )

    async def _view(self, name: Any, read: Callable[[], Awaitable[Any]]) -> Any:
        found = self._views.get(name)
        if found is not None and time.monotonic() - found[0] < WORKERS_TTL_S:
            return found[1]
        async with self._lock:
            found = self._views.get(name)
            if found is None or time.monotonic() - found[0] >= WORKERS_TTL_S:
                found = (time.monotonic(), await read())
                self._views[name] = found
        return found[1]

    async def _read(self, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
        client = self._hub.redis
        pipe = client.pipeline(transaction=False)
        for kind in kinds:
            pipe.zrangebyscore(self._keys.worker_beats(kind), *worker_index.live_window())
        found = list(dict.fromkeys(host for hosts in await pipe.execute() for host in hosts))
        if not found:
            return []
        pipe = client.pipeline(transaction=False)
        for host in found:
            pipe.hgetall(self._keys.worker(host))
        now, timeout = time.time(), self.config.worker_timeout
        workers = []
        for info in await pipe.execute():
            if not info or now - float(info.get("beat") or 0) > timeout:
                continue
            for name, empty in (("stages", "[]"), ("queues", "[]"), ("models", "{}")):
                info[name] = _json(info.get(name), empty)
            workers.append(info)
        return workers

    async def models(self) -> dict[str, dict[str, Any]]:
        """Model id -> {"stage", "created"} of every model a live worker serves."""
        served: dict[str, dict[str, Any]] = {}
        for worker in await self.all():
            for stage, model in (worker.get("models") or {}).items():
                started = int(float(worker.get("started") or 0))
                entry = served.setdefault(model, {"stage": stage, "created": started})
                entry["created"] = min(entry["created"], started)
        return served

    async def require(self, stages: tuple[Stage, ...], model: str | None = None) -> None:
        """503 unless a live worker serves every stage; 404 for a text model none serves
        (a diffusion model is checked against the registry instead: `accept`)."""
        for stage in stages:
            text_model = model if stage == "ar" and stages == ("ar",) else None
            serving = await self.serving(stage) if text_model else None
            if not (serving if serving is not None else await self.count(stage)):
                pool = self.config.pool_for(stage).queue
                raise APIError(
                    503,
                    f"no live worker serves the {POOL_NAMES[stage]} pool (queue {pool!r})",
                    code="no_live_worker",
                    headers={"Retry-After": "5"},
                )
            served = {w["models"][stage] for w in serving or [] if stage in w["models"]}
            if text_model is not None and served and text_model not in served:
                raise APIError(
                    404,
                    f"model {text_model!r} is not served here; live workers serve {sorted(served)}",
                    param="model",
                    code="model_not_found",
                )


def priority_of(body_priority: str | None, header: str | None) -> str:
    """The body's `priority`, else the `X-Priority` header, else normal."""
    if body_priority is not None:
        return body_priority
    if header is None:
        return "normal"
    value = header.strip().lower()
    if value not in PRIORITIES:
        raise APIError(
            400,
            f"X-Priority: must be one of {PRIORITIES}",
            param="X-Priority",
            code="invalid_value",
        )
    return value


async def accept(
    workers: LiveWorkers, request: OmniRequest, *, model: str | None = None, kind: str = ""
) -> None:
    """Enqueue `request` once a live worker serves its pools (the producer's `submit`,
    in a thread: it talks to Redis synchronously). QueueFullError and the other
    producer errors pass on to the app's handlers; an unregistered diffusion model is
    refused first (`RequestValidationError`, 400 naming `model`)."""
    check_model(request, workers.config)
    stages = stages_of(request.request_type)
    await workers.require(stages, model)
    if kind == PROBE:
        message = request.to_message()
        await asyncio.to_thread(lambda: probe.apply_async(kwargs=message))
        return
    await asyncio.to_thread(submit, request)


async def withdraw(request_id: str, request_type: RequestType | None) -> None:
    """Cancel a request (queued or running): the producer's `cancel`, in a thread."""
    await asyncio.to_thread(cancel, request_id, request_type)


def _json(raw: Any, empty: str) -> Any:
    try:
        return json.loads(raw or empty)
    except ValueError:
        return json.loads(empty)
