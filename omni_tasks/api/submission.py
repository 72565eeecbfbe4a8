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
from typing import Any

from omni_tasks.api.errors import APIError
from omni_tasks.api.hub import ResultHub
from omni_tasks.config import get_config
from omni_tasks.coordination import keys, worker_index
from omni_tasks.model_registry import check_model
from omni_tasks.requests import OmniRequest, RequestType, Stage, stages_of
from omni_tasks.tasks.definitions import probe
from omni_tasks.tasks.producer import cancel, submit

#: How long one read of the heartbeats serves this process.
WORKERS_TTL_S = 2.0
POOL_NAMES = {"ar": "AR (text)", "dit": "diffusion"}
PRIORITIES = ("high", "normal", "low")
#: The job type that runs no engine: the queue path alone, end to end.
PROBE = "probe"


class LiveWorkers:
    """The live workers as their heartbeats describe them, read at most once per
    `WORKERS_TTL_S` however many requests ask."""

    def __init__(self, hub: ResultHub) -> None:
        self._hub = hub
        self._read_at = -1.0
        self._workers: list[dict[str, Any]] = []
        self._lock = asyncio.Lock()

    async def all(self) -> list[dict[str, Any]]:
        if time.monotonic() - self._read_at < WORKERS_TTL_S:
            return self._workers
        async with self._lock:
            if time.monotonic() - self._read_at >= WORKERS_TTL_S:
                self._workers = await self._read()
                self._read_at = time.monotonic()
        return self._workers

    async def _read(self) -> list[dict[str, Any]]:
        client = self._hub.redis
        cutoff = time.time() - worker_index.HEARTBEAT_TTL_S
        pipe = client.pipeline(transaction=False)
        for kind in worker_index.KINDS:
            pipe.zrangebyscore(keys.worker_beats(kind), f"({cutoff}", "+inf")
        found = [host for hosts in await pipe.execute() for host in hosts]
        if not found:
            return []
        pipe = client.pipeline(transaction=False)
        for host in found:
            pipe.hgetall(keys.worker(host))
        now, timeout = time.time(), get_config().worker_timeout
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
        workers = await self.all()
        for stage in stages:
            serving = [w for w in workers if stage in w.get("stages", [])]
            if not serving:
                pool = get_config().pool_for(stage).queue
                raise APIError(
                    503,
                    f"no live worker serves the {POOL_NAMES[stage]} pool (queue {pool!r})",
                    code="no_live_worker",
                    headers={"Retry-After": "5"},
                )
            served = {w["models"][stage] for w in serving if stage in (w.get("models") or {})}
            if model is not None and stages == ("ar",) and served and model not in served:
                raise APIError(
                    404,
                    f"model {model!r} is not served here; live workers serve {sorted(served)}",
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
    check_model(request, get_config())
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
