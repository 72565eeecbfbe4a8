"""OpenAI's video endpoints on the diffusion pool's video models.

- `POST /v1/videos` (multipart, as OpenAI's SDKs send it, or JSON): `prompt`, `model`,
  `seconds`, `size` ("WxH"), `input_reference` (an image file, or a base64 / data-URL
  string, or `{"image_url": "data:..."}`) for image-to-video; extras `num_frames`,
  `fps`, `steps`, `seed`, `negative_prompt`, `guidance_scale`, `lora`, `priority`,
  `timeout_s`, `webhook_url` (`video_objects.VideoOptions`). Validated before anything
  is enqueued; answers the video object (`video_objects.video_view`).
- `GET /v1/videos/{id}`, `GET /v1/videos` (`after`, `limit`, `order`: OpenAI's cursor
  list, from the index in Redis).
- `GET /v1/videos/{id}/content?variant=video|thumbnail|spritesheet`: the MP4, PNG or
  JPEG; 404 until the video has completed.
- `DELETE /v1/videos/{id}`: cancels it if it has not ended (at its next denoising
  step), deletes its files and forgets it: `{"id", "object": "video.deleted",
  "deleted": true}`; 404 from then on.
- `POST /v1/videos/{id}/remix` `{prompt}`: a new video with the source's settings.
- `GET /v1/videos/{id}/events`: Server-Sent Events `video.<status>` carrying the video
  object at each change of status or progress, until it has ended.

A video is a job of the job API (type `video`): idempotency keys, webhooks and
cancellation are the jobs'. Everything is in Redis, so any API process serves any video.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import UploadFile

from omni_tasks.api.context import config_of, keys_of, registries_of
from omni_tasks.api.errors import APIError, body_error, invalid, request_error
from omni_tasks.api.files import base_url_of, output_root
from omni_tasks.api.hub import ResultHub, meta_key, next_message
from omni_tasks.api.idempotency import CallKey, call_key
from omni_tasks.api.job_state import JobRecord, status_of
from omni_tasks.api.jobs import accept_job, cancel_record, json_object
from omni_tasks.api.sse import KEEPALIVE, KEEPALIVE_S, event, streaming
from omni_tasks.api.submission import priority_of
from omni_tasks.api.video_objects import (
    ENDED,
    VARIANTS,
    VideoOptions,
    VideoRecord,
    build_video,
    index_video,
    load_video,
    page_ids,
    reference_image,
    video_record,
    video_view,
)
from omni_tasks.api.webhooks import check_url
from omni_tasks.config import CoreModuleConfig
from omni_tasks.errors import RequestValidationError
from omni_tasks.requests import OmniRequest, create_video_request

router = APIRouter()

#: What the SDKs' `poll()` waits between two reads (`openai-poll-after-ms`).
POLL_AFTER_MS = 500
#: How long a DELETE waits for a running video to stop, to delete what it wrote.
DELETE_WAIT_S = 5.0
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
REFERENCE = "input_reference"


class RemixOptions(BaseModel):
    """The body of `POST /v1/videos/{id}/remix`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    priority: Literal["high", "normal", "low"] | None = None
    webhook_url: str | None = None


@router.post("/v1/videos")
async def create_video(request: Request) -> JSONResponse:
    config = config_of(request)
    fields, upload = await _create_fields(request)
    try:
        options = VideoOptions.model_validate(fields)
    except ValidationError as exc:
        raise body_error(exc.errors()) from None
    if upload is not None and options.input_reference is not None:
        raise invalid(REFERENCE, "give one input image, not a file and a string")
    secret = config.api.webhook_secret
    webhook_url = None if options.webhook_url is None else check_url(options.webhook_url, secret)
    priority = priority_of(options.priority, request.headers.get("x-priority"))
    key = call_key(request)
    image = reference_image(upload if upload is not None else options.input_reference)
    omni = build_video(
        options, priority, image, key.request_id(), registries=registries_of(request)
    )
    record = video_record(
        omni,
        config,
        base_url=base_url_of(request),
        webhook_url=webhook_url,
        seconds=options.seconds_text(),
    )
    return await _launch(request, key, omni, record)


async def _create_fields(request: Request) -> tuple[dict[str, Any], bytes | None]:
    """The create call's fields, and the bytes of an uploaded `input_reference`."""
    if not request.headers.get("content-type", "").startswith(FORM_TYPES):
        return await json_object(request), None
    form = await request.form()
    fields: dict[str, Any] = {}
    upload: bytes | None = None
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name != REFERENCE:
                raise invalid(name, "must be a form field, not a file")
            upload = await value.read()
        elif name.endswith("[]"):  # a list, as the SDKs send one (`lora[]`)
            fields.setdefault(name[:-2], []).append(value)
        elif name.startswith(f"{REFERENCE}[") and name.endswith("]"):  # {image_url}
            fields.setdefault(REFERENCE, {})[name[len(REFERENCE) + 1 : -1]] = value
        else:
            fields[name] = value
    return fields, upload


async def _launch(
    request: Request, key: CallKey, omni: OmniRequest, record: VideoRecord
) -> JSONResponse:
    """Accept the video's job (the job API's path: idempotency, webhook), list it, and
    answer its object."""
    hub: ResultHub = request.app.state.hub
    stored, created = await accept_job(request, key, omni, record)
    video = VideoRecord.of(stored) or record
    await index_video(hub, video)
    if video.webhook_url and created:
        request.app.state.webhooks.follow(video)
    config = config_of(request)
    return JSONResponse(video_view(video, await hub.metas(video.task_ids), config))


async def _video(request: Request, video_id: str) -> VideoRecord:
    record = await load_video(request.app.state.hub, video_id)
    if record is None:
        raise APIError(404, f"no video {video_id!r}", param="video_id", code="video_not_found")
    return record


@router.get("/v1/videos")
async def list_videos(
    request: Request,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
) -> JSONResponse:
    """A page of the videos, newest first by default, as OpenAI's cursor lists are."""
    hub: ResultHub = request.app.state.hub
    config = config_of(request)
    keys = keys_of(request)
    ids, has_more = await page_ids(hub, after, limit, order, config.result_expires)
    pipe = hub.redis.pipeline(transaction=False)
    for video_id in ids:
        pipe.hgetall(keys.api_job(video_id))
    raws = await pipe.execute()
    records = [load for i, r in zip(ids, raws, strict=True) if (load := _from_raw(i, r))]
    gone = [i for i in ids if i not in {r.id for r in records}]
    if gone:  # expired (or deleted meanwhile): no longer listed
        await hub.redis.zrem(keys.api_videos(), *gone)
    metas = await hub.metas([r.id for r in records]) if records else []
    data = [video_view(r, [m], config) for r, m in zip(records, metas, strict=True)]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    body = {"object": "list", "data": data, "first_id": first, "last_id": last}
    return JSONResponse({**body, "has_more": has_more})


def _from_raw(video_id: str, raw: dict[str, str]) -> VideoRecord | None:
    return VideoRecord.of(JobRecord.from_redis(video_id, raw)) if raw else None


@router.get("/v1/videos/{video_id}")
async def retrieve_video(video_id: str, request: Request) -> JSONResponse:
    hub: ResultHub = request.app.state.hub
    record = await _video(request, video_id)
    view = video_view(record, await hub.metas(record.task_ids), config_of(request))
    return JSONResponse(view, headers={"openai-poll-after-ms": str(POLL_AFTER_MS)})


@router.get("/v1/videos/{video_id}/content")
async def video_content(
    video_id: str,
    request: Request,
    variant: Literal["video", "thumbnail", "spritesheet"] = "video",
) -> Response:
    """A completed video's file: 404 while it is queued or running, or has failed."""
    hub: ResultHub = request.app.state.hub
    record = await _video(request, video_id)
    metas = await hub.metas(record.task_ids)
    status, final = status_of(metas)
    if status != "succeeded" or final is None:
        shown = video_view(record, metas, config_of(request))["status"]
        message = f"video {video_id} is {shown}: its content is there once it has completed"
        raise APIError(404, message, param="video_id", code="video_not_ready")
    field, media_type, suffix = VARIANTS[variant]
    path = _output_file(final["result"].get(field), variant, output_root(config_of(request)))
    return FileResponse(path, media_type=media_type, filename=f"{video_id}.{suffix}")


def _output_file(path: Any, variant: str, root: Path) -> Path:
    """A worker's file, if it is a file under this API's output_dir (`root`)."""
    try:
        found = Path(str(path)).resolve(strict=True)
    except OSError:
        raise APIError(404, f"the video's {variant} is gone", code="file_not_found") from None
    try:
        found.relative_to(root)
    except ValueError:
        raise APIError(
            500,
            "the video is not under this API's output_dir: give the API and the diffusion "
            "workers the same output_dir (a shared volume)",
            code="video_unreachable",
        ) from None
    return found


@router.delete("/v1/videos/{video_id}")
async def delete_video(video_id: str, request: Request) -> JSONResponse:
    """Forget the video at once (GET is 404 from now on), cancel it if it has not
    ended, then delete its files (once it has stopped, within `DELETE_WAIT_S`)."""
    hub: ResultHub = request.app.state.hub
    record, keys = await _video(request, video_id), keys_of(request)
    pipe = hub.redis.pipeline(transaction=True)
    pipe.delete(keys.api_job(video_id))
    pipe.zrem(keys.api_videos(), video_id)
    pipe.zrem(keys.webhook_watch(), video_id)
    deleted, *_ = await pipe.execute()
    if not deleted:  # another call deleted it meanwhile
        raise APIError(404, f"no video {video_id!r}", param="video_id", code="video_not_found")
    metas = await hub.metas(record.task_ids)
    final = metas[-1]
    if status_of(metas)[0] not in ("succeeded", "failed", "cancelled", "expired"):
        await cancel_record(record, metas)
        final = await hub.wait(record.id, DELETE_WAIT_S)
    if final and final.get("status") == "SUCCESS":
        root = output_root(config_of(request))
        await asyncio.to_thread(_delete_files, final["result"], root)
    return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})


def _delete_files(result: dict[str, Any], root: Path) -> None:
    """Delete a result's files under output_dir (`root`, only there)."""
    for field, _, _ in VARIANTS.values():
        if not result.get(field):
            continue
        path = Path(str(result[field])).resolve()
        if path.is_relative_to(root):
            path.unlink(missing_ok=True)


@router.post("/v1/videos/{video_id}/remix")
async def remix_video(video_id: str, request: Request) -> JSONResponse:
    """A new video with the source's settings (model, size, frames, seed, steps, input
    image, ...) and a new prompt."""
    config = config_of(request)
    source = await _video(request, video_id)
    try:
        options = RemixOptions.model_validate(await json_object(request))
    except ValidationError as exc:
        raise body_error(exc.errors()) from None
    secret = config.api.webhook_secret
    webhook_url = None if options.webhook_url is None else check_url(options.webhook_url, secret)
    settings = {**source.settings(), "model": source.model}
    if options.priority or request.headers.get("x-priority"):
        settings["priority"] = priority_of(options.priority, request.headers.get("x-priority"))
    key = call_key(request)
    try:
        omni = create_video_request(
            options.prompt, key.request_id(), registries=registries_of(request), **settings
        )
    except RequestValidationError as exc:
        raise request_error(exc) from None
    record = video_record(
        omni,
        config,
        base_url=base_url_of(request),
        webhook_url=webhook_url,
        seconds=source.seconds,
        remixed_from=source.id,
    )
    return await _launch(request, key, omni, record)


@router.get("/v1/videos/{video_id}/events")
async def video_event_stream(video_id: str, request: Request) -> Response:
    record = await _video(request, video_id)
    return streaming(video_events(request.app.state.hub, record, config_of(request)))


async def video_events(
    hub: ResultHub, record: VideoRecord, config: CoreModuleConfig
) -> AsyncIterator[bytes]:
    """`video.<status>` with the video object at each change of status or progress;
    the stream ends with `video.completed` or `video.failed`."""
    async with hub.listen([meta_key(t) for t in record.task_ids]) as queue:
        last: tuple[str, int] | None = None
        while True:
            view = video_view(record, await hub.metas(record.task_ids), config)
            if (view["status"], view["progress"]) != last:
                last = (view["status"], view["progress"])
                yield event(f"video.{view['status']}", view)
            if view["status"] in ENDED:
                return
            if await next_message(queue, KEEPALIVE_S) is None:
                yield KEEPALIVE
