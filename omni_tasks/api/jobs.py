"""The job API: any request type, submitted, polled, cancelled, streamed, with a webhook.

- `POST /v1/jobs` `{"type": "text"|"chat"|"diffusion"|"image"|"multimodal"|"video"|
  "speech"|"audio"|"probe",
  ...the request's fields, "webhook_url"?}` -> `202` and the job. A text or chat job
  streams its text (`delta` events) unless it sends `"stream": false`. With `Prefer: wait=N` it
  waits up to N seconds (at most `api.wait_timeout_s`) and answers `200` if the job
  ended by then. `probe` runs no engine: the queue path alone, end to end. With an
  `Idempotency-Key` the job id comes from the key (`idempotency`): the same key and
  body again answer the same job, which runs once; another body under it is 409.
  A `video` job is a video of `/v1/videos` as well (listed there); its view links
  its files (`video_url`, `thumbnail_url`, `spritesheet_url`) instead of their paths; a
  `speech` (`input`, `voice`, ...) or `audio` job's view links its file (`audio_url`).
- `GET /v1/jobs/{id}` -> the job (`job_state.job_view`).
- `DELETE /v1/jobs/{id}` -> cancels it, queued or running (409 once it has ended,
  a second DELETE included).
- `GET /v1/jobs/{id}/events` -> Server-Sent Events (`sse.job_events`).
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from omni_tasks.api.context import config_of, registries_of
from omni_tasks.api.errors import APIError, invalid
from omni_tasks.api.files import base_url_of, output_root
from omni_tasks.api.hub import FALLBACK_S, ResultHub, is_final, meta_key, next_message
from omni_tasks.api.idempotency import (
    CallKey,
    KeyedCall,
    call_fingerprint,
    call_key,
    surely_refused,
)
from omni_tasks.api.job_state import FINAL, STREAMED, JobRecord, job_view, load_record, status_of
from omni_tasks.api.sse import job_events, streaming
from omni_tasks.api.submission import PROBE, accept, priority_of, withdraw
from omni_tasks.api.video_objects import VIDEO, index_video, video_record
from omni_tasks.api.webhooks import SWEEP_S, check_url
from omni_tasks.config import Registries
from omni_tasks.requests import (
    OmniRequest,
    create_audio_request,
    create_chat_request,
    create_diffusion_request,
    create_image_request,
    create_multimodal_request,
    create_speech_request,
    create_text_request,
    create_video_request,
)

router = APIRouter()

BUILDERS = {
    "text": create_text_request,
    "chat": create_chat_request,
    "diffusion": create_diffusion_request,
    "multimodal": create_multimodal_request,
    VIDEO: create_video_request,
    "speech": create_speech_request,
    "audio": create_audio_request,
    PROBE: create_text_request,
}
#: The field a job of a type cannot do without (the rest: `prompt`).
NEEDED = {"chat": "messages", "speech": "input"}
JOB_TYPES = (*BUILDERS, "image")
_PREFER_WAIT = re.compile(r"(?:^|[;,\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.I)


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or 400."""
    try:
        body = await request.json()
    except ValueError:
        raise APIError(400, "the body is not valid JSON", code="bad_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="bad_json")
    return body


def build_request(
    kind: Any, fields: dict[str, Any], request_id: str | None, *, registries: Registries
) -> OmniRequest:
    """The validated request of a job (RequestValidationError names a bad field), its
    names checked against `registries` (the app's); its id is `request_id` (a keyed
    call's) or a new one."""
    if kind not in JOB_TYPES:
        raise invalid("type", f"must be one of {list(JOB_TYPES)}")
    if "request_id" in fields or "request_type" in fields:
        name = "request_id" if "request_id" in fields else "request_type"
        raise invalid(name, "is set by the API (the job id is the request id)")
    if "registries" in fields:  # the app's config names them, never the body
        raise invalid("registries", "Extra inputs are not permitted")
    needed = NEEDED.get(kind, "prompt")
    if needed not in fields:
        raise invalid(needed, "field required")
    if kind in STREAMED:
        fields.setdefault("stream", True)
    prompt = fields.pop(needed)
    if kind == "image":
        if "image" not in fields:
            raise invalid("image", "an image job needs an input image (base64)")
        image = fields.pop("image")
        return create_image_request(prompt, image, request_id, registries=registries, **fields)
    return BUILDERS[kind](prompt, request_id, registries=registries, **fields)


def prefer_wait(header: str | None, cap_s: float) -> float:
    """Seconds of `Prefer: wait=N` (0 without it), capped by `cap_s` (`api.wait_timeout_s`)."""
    found = _PREFER_WAIT.search(header or "")
    return min(float(found.group(1)), cap_s) if found else 0.0


@router.post("/v1/jobs", status_code=202)
async def create_job(request: Request) -> JSONResponse:
    hub: ResultHub = request.app.state.hub
    config = config_of(request)
    body = await json_object(request)
    key = call_key(request)
    kind = body.pop("type", None)
    webhook_url = body.pop("webhook_url", None)
    if webhook_url is not None:
        check_url(webhook_url, config.api.webhook_secret)
    body["priority"] = priority_of(body.get("priority"), request.headers.get("x-priority"))
    omni = build_request(kind, body, key.request_id(), registries=registries_of(request))
    record = JobRecord(
        id=omni.request_id,
        type=kind,
        created_at=omni.created_at,
        base_url=base_url_of(request),
        webhook_url=webhook_url,
        partial_images=omni.partial_images,
    )
    if kind == VIDEO:
        record = video_record(omni, config, base_url=record.base_url, webhook_url=webhook_url)
    record, created = await accept_job(request, key, omni, record)
    if kind == VIDEO:
        await index_video(hub, record)
    if webhook_url and created:
        request.app.state.webhooks.follow(record)
    wait_s = prefer_wait(request.headers.get("prefer"), config.api.wait_timeout_s)
    return await _answer(hub, record, wait_s, output_root(config))


async def accept_job(
    request: Request, key: CallKey, omni: OmniRequest, record: JobRecord
) -> tuple[JobRecord, bool]:
    """Store the job's record and enqueue its request: (the job's record, whether this
    call created it). A keyed repeat leaves the first call's record as it is and
    answers it; a failure forgets only a record this call created, and only when
    nothing was accepted."""
    hub: ResultHub = request.app.state.hub
    ttl_s = config_of(request).result_expires
    options = {"type": record.type, "webhook_url": record.webhook_url}
    fingerprint = call_fingerprint("jobs", [omni], options)
    async with KeyedCall(hub, key, fingerprint, ttl_s) as call:
        created = await _store(hub, record, ttl_s)
        try:
            await accept(request.app.state.workers, omni, model=omni.model, kind=record.type)
        except BaseException as exc:
            if created and surely_refused(exc):
                await _forget(hub, record)
            raise
        call.accepted = True
    if created:
        return record, True
    created = await _store(hub, record, ttl_s)  # a repeat: stored again only if the first gave up
    return (await load_record(hub, record.id) or record), created


async def _answer(hub: ResultHub, record: JobRecord, wait_s: float, root: Path) -> JSONResponse:
    """The job now, or once it ended within `wait_s`: 200 when it has ended, else 202
    (its files named under `root`, the output_dir)."""
    if wait_s > 0 and len(record.task_ids) == 1:
        meta = await hub.wait(record.id, wait_s)
        metas = [meta] if meta is not None else await hub.metas(record.task_ids)
    elif wait_s > 0:
        metas = await _wait_stages(hub, record, wait_s)
    else:
        metas = await hub.metas(record.task_ids)
    view = job_view(record, metas, root)
    return JSONResponse(view, status_code=200 if view["status"] in FINAL else 202)


async def _wait_stages(
    hub: ResultHub, record: JobRecord, wait_s: float
) -> list[dict[str, Any] | None]:
    """The states of a job of several stages once it ended (or after `wait_s`): the
    last stage's result, or an earlier stage's failure."""
    deadline = time.monotonic() + wait_s
    async with hub.listen([meta_key(t) for t in record.task_ids]) as queue:
        while True:
            metas = await hub.metas(record.task_ids)
            remaining = deadline - time.monotonic()
            if status_of(metas)[0] in FINAL or remaining <= 0:
                return metas
            await next_message(queue, min(remaining, FALLBACK_S))


#: Writes a job's record unless one is there (a keyed repeat never overwrites it).
_STORE_NEW = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3]) end
return 1
"""


async def _store(hub: ResultHub, record: JobRecord, ttl_s: float) -> bool:
    """Write the job's record (and its webhook watch), kept `ttl_s`, unless the job has
    one; whether this wrote it."""
    watch = repr(time.time() + SWEEP_S) if record.webhook_url else ""
    fields = [item for pair in record.to_redis().items() for item in pair]
    ttl = int(ttl_s)
    stored = await hub.redis.eval(
        _STORE_NEW,
        2,
        hub.keys.api_job(record.id),
        hub.keys.webhook_watch(),
        ttl,
        watch,
        record.id,
        *fields,
    )
    return bool(stored)


async def _forget(hub: ResultHub, record: JobRecord) -> None:
    """The request was not accepted: no job, no webhook."""
    await hub.redis.delete(hub.keys.api_job(record.id))
    if record.webhook_url:
        await hub.redis.zrem(hub.keys.webhook_watch(), record.id)


async def _record(request: Request, job_id: str) -> JobRecord:
    record = await load_record(request.app.state.hub, job_id)
    if record is None:
        raise APIError(404, f"no job {job_id!r}", param="id", code="job_not_found")
    return record


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> JSONResponse:
    hub: ResultHub = request.app.state.hub
    record, root = await _record(request, job_id), output_root(config_of(request))
    return JSONResponse(job_view(record, await hub.metas(record.task_ids), root))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> JSONResponse:
    """Cancel: a queued job is cancelled at once; a running one leaves at its next step
    boundary (its status turns `cancelled` then)."""
    hub: ResultHub = request.app.state.hub
    record, root = await _record(request, job_id), output_root(config_of(request))
    metas = await hub.metas(record.task_ids)
    view = job_view(record, metas, root)
    if view["status"] in FINAL:
        message = f"job {job_id} has already ended ({view['status']}): nothing to cancel"
        raise APIError(409, message, code="job_ended")
    await cancel_record(record, metas)
    return JSONResponse(job_view(record, await hub.metas(record.task_ids), root))


async def cancel_record(record: JobRecord, metas: list[dict[str, Any] | None]) -> None:
    """Cancel a job that has not ended: withdrawn from its workers, and a queued one's
    tasks recorded as revoked now."""
    await withdraw(record.id, record.request_type)
    if status_of(metas)[0] == "queued":
        await asyncio.to_thread(_mark_cancelled, record.task_ids, metas)


def _mark_cancelled(task_ids: list[str], metas: list[dict[str, Any] | None]) -> None:
    """Record a queued job's tasks as revoked now (the workers skip their messages)."""
    from omni_tasks.tasks.celery_app import app

    for task_id, meta in zip(task_ids, metas, strict=True):
        if not is_final(meta):
            app.backend.mark_as_revoked(task_id, "cancelled before it ran")


@router.get("/v1/jobs/{job_id}/events")
async def job_event_stream(job_id: str, request: Request) -> Response:
    record = await _record(request, job_id)
    root = output_root(config_of(request))
    return streaming(job_events(request.app.state.hub, record, root))
