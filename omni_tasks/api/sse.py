"""Server-Sent Events: the encoding, and the two streams the API serves.

- `job_events` (`GET /v1/jobs/{id}/events`): `status` on each change, `progress` with
  each new figure, `partial_image` for each preview the job asked for, `delta` for each
  piece of a streamed text job's text ({id, index, text}), then `result` (the final job
  object) and the end of the stream.
- `image_events` (`stream: true` on the image endpoints): OpenAI's
  `image_generation.partial_image` events, then `image_generation.completed`, or an
  `error` event, which the OpenAI SDKs raise.

Both wake on the pub/sub messages of the job's channels (`ResultHub.listen`), never on
a timer, and send a comment line every `KEEPALIVE_S` so proxies keep the stream open.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi.responses import StreamingResponse

from omni_tasks.api.errors import from_failure
from omni_tasks.api.files import encode, image_b64
from omni_tasks.api.hub import ResultHub, is_final, meta_key, next_message
from omni_tasks.api.job_state import FINAL, STREAMED, JobRecord, job_view

KEEPALIVE_S = 15.0
KEEPALIVE = b": keep-alive\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(name: str | None, data: Any) -> bytes:
    """One SSE event; `data` as compact JSON (or as is when it is a string)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {text}\n\n".encode()


def streaming(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=HEADERS)


async def read_previews(hub: ResultHub, request_id: str, start: int) -> list[dict[str, Any]]:
    """The previews a worker published for `request_id`, from index `start` on."""
    raw = await hub.redis.lrange(hub.keys.previews(request_id), start, -1)
    return [json.loads(r) for r in raw]


async def job_events(hub: ResultHub, record: JobRecord, root: Path) -> AsyncIterator[bytes]:
    """The job's events; its files named under `root` (the output_dir)."""
    channels = [meta_key(t) for t in record.task_ids]
    if record.partial_images:
        channels.append(hub.keys.previews(record.id))
    texts = record.type in STREAMED
    if texts:
        channels.append(hub.keys.text_deltas(record.id))
    async with hub.listen(channels) as queue:
        status, progress, previews, pieces = None, None, 0, 0
        while True:
            view = job_view(record, await hub.metas(record.task_ids), root)
            if texts:  # after the state: once it is final, every piece is in
                for piece in await _pieces(hub, record.id, pieces):
                    pieces += 1
                    yield event("delta", {"id": record.id, "index": piece["i"], "text": piece["t"]})
            if view["status"] != status:
                status = view["status"]
                yield event("status", {"id": record.id, "status": status})
            if view["progress"] and view["progress"] != progress:
                progress = view["progress"]
                yield event("progress", {"id": record.id, "progress": progress})
            if record.partial_images:
                for preview in await read_previews(hub, record.id, previews):
                    previews += 1
                    yield event("partial_image", _job_preview(record.id, preview))
            if status in FINAL:
                yield event("result", view)
                return
            if await next_message(queue, KEEPALIVE_S) is None:
                yield KEEPALIVE


async def _pieces(hub: ResultHub, request_id: str, start: int) -> list[dict[str, Any]]:
    raw = await hub.redis.lrange(hub.keys.text_deltas(request_id), start, -1)
    return [json.loads(r) for r in raw]


def _job_preview(job_id: str, preview: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": job_id,
        "index": preview["index"],
        "step": preview["step"],
        "steps": preview["steps"],
        "b64_json": preview["b64_png"],
        "output_format": "png",
    }


async def image_events(
    hub: ResultHub,
    request_id: str,
    describe: Callable[[], dict[str, Any]],
    output_format: str,
    compression: int | None,
) -> AsyncIterator[bytes]:
    """OpenAI's image stream for one request; `describe()` gives the fields every event
    repeats (size, quality, background, output_format)."""
    channels = [meta_key(request_id), hub.keys.previews(request_id)]
    async with hub.listen(channels) as queue:
        sent = 0
        while True:
            meta = await hub.meta(request_id)  # final: every preview is already written
            for preview in await read_previews(hub, request_id, sent):
                sent += 1
                data = preview["b64_png"]
                if output_format != "png":
                    png = base64.b64decode(data)
                    converted = await asyncio.to_thread(encode, png, output_format, compression)
                    data = base64.b64encode(converted).decode("ascii")
                yield event(
                    "image_generation.partial_image",
                    {
                        "type": "image_generation.partial_image",
                        "b64_json": data,
                        "partial_image_index": preview["index"],
                        "created_at": int(time.time()),
                        **describe(),
                    },
                )
            if is_final(meta):
                yield await _image_outcome(meta, request_id, describe, output_format, compression)
                return
            if await next_message(queue, KEEPALIVE_S) is None:
                yield KEEPALIVE


async def _image_outcome(
    meta: dict[str, Any],
    request_id: str,
    describe: Callable[[], dict[str, Any]],
    output_format: str,
    compression: int | None,
) -> bytes:
    if meta.get("status") != "SUCCESS":
        return event("error", from_failure(meta.get("result"), request_id).body())
    path = meta["result"]["image_path"]
    completed = {
        "type": "image_generation.completed",
        "b64_json": await image_b64(path, output_format, compression),
        "created_at": int(time.time()),
        **describe(),
        "usage": IMAGE_USAGE,
    }
    return event("image_generation.completed", completed)


#: Diffusion requests count no tokens; the field is there for clients that read it.
IMAGE_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}
