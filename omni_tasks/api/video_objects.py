"""What `/v1/videos` takes, keeps and answers.

- `VideoOptions`: the body of `POST /v1/videos` (JSON, or form fields, which come as
  text and are coerced), turned into a VIDEO request by `build_video`; a bad field is
  400 naming it as the client sent it (`size`, `seconds`, `input_reference`, ...).
- `VideoRecord`: a video is a job (`job_state.JobRecord`, type `video`) whose hash also
  holds what OpenAI's video object repeats (model, seconds, size, prompt) and the
  request's settings for a remix, so any API process answers for any video.
- `video_view`: OpenAI's video object. Status: the job's `queued` is `queued`,
  `running` is `in_progress`, `succeeded` is `completed`; `failed`, `cancelled` and
  `expired` are `failed`, with `error` {code, message}. `progress` is the running
  step's share (0-100; 100 once completed).
- The index (`KeySpace.api_videos`): a sorted set of video ids by creation time, which
  `GET /v1/videos` pages through by rank; ids past `result_expires` are pruned.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from omni_tasks.api.errors import invalid, request_error
from omni_tasks.api.files import output_root
from omni_tasks.api.hub import ResultHub
from omni_tasks.api.job_state import JobRecord, job_view, progress_of
from omni_tasks.api.openai_images import input_size
from omni_tasks.config import CoreModuleConfig, Registries
from omni_tasks.errors import RequestValidationError
from omni_tasks.image_input import inline_image_b64
from omni_tasks.model_registry import dit_model
from omni_tasks.requests import OmniRequest, create_video_request
from omni_tasks.video_fields import DEFAULT_FRAMES

VIDEO = "video"
#: The job's status -> the video object's.
STATUSES = MappingProxyType(
    {
        "queued": "queued",
        "running": "in_progress",
        "succeeded": "completed",
        "failed": "failed",
        "cancelled": "failed",
        "expired": "failed",
    }
)
ENDED = ("completed", "failed")
#: The request's fields -> the names `/v1/videos` takes them by.
PARAM_NAMES = MappingProxyType(
    {"width": "size", "height": "size", "guidance": "guidance_scale", "image": "input_reference"}
)
#: A video's downloadable files: variant -> (the result's field, media type, suffix).
VARIANTS = MappingProxyType(
    {
        "video": ("video_path", "video/mp4", "mp4"),
        "thumbnail": ("thumbnail_path", "image/png", "png"),
        "spritesheet": ("spritesheet_path", "image/jpeg", "jpg"),
    }
)
#: Request fields a remix does not inherit: the new request has its own.
NOT_SETTINGS = ("request_id", "request_type", "created_at", "prompt")


class VideoOptions(BaseModel):
    """The fields of `POST /v1/videos`: OpenAI's, then our extras."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    seconds: str | float | None = None
    size: str | None = None
    input_reference: str | dict[str, str] | None = None
    num_frames: int | None = None
    fps: int | None = None
    steps: int | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    lora: Any = None
    priority: Literal["high", "normal", "low"] | None = None
    timeout_s: float | None = None
    webhook_url: str | None = None

    def seconds_value(self) -> float | None:
        """`seconds` as a number ("4" as OpenAI's clients send it, or 4)."""
        if self.seconds is None:
            return None
        try:
            value = float(self.seconds)
        except ValueError:
            raise invalid("seconds", f"must be a number of seconds, got {self.seconds!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise invalid("seconds", "must be a finite number")
        return value

    def seconds_text(self) -> str | None:
        """What the video object echoes as `seconds` ("4", "2.5")."""
        value = self.seconds_value()
        return None if value is None else f"{value:g}"

    def request_fields(self, priority: str) -> dict[str, Any]:
        """The VIDEO request's fields (the prompt and image aside)."""
        seconds = self.seconds_value()
        named = {
            "model": self.model,
            "seconds": int(seconds) if seconds is not None and seconds.is_integer() else seconds,
            "num_frames": self.num_frames,
            "fps": self.fps,
            "steps": self.steps,
            "seed": self.seed,
            "negative_prompt": self.negative_prompt,
            "guidance": self.guidance_scale,
            "lora": self.lora,
            "timeout_s": self.timeout_s,
        }
        fields = {"priority": priority, **parse_size(self.size)}
        fields.update({k: v for k, v in named.items() if v is not None})
        return fields


def parse_size(size: str | None) -> dict[str, int]:
    """`WIDTHxHEIGHT` as the request's width and height (none: the request's defaults)."""
    if size is None:
        return {}
    width, sep, height = size.strip().lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise invalid("size", f"must be WIDTHxHEIGHT, e.g. 64x64, got {size!r}")
    return {"width": int(width), "height": int(height)}


def reference_image(value: str | dict[str, str] | bytes | None) -> str | None:
    """The input image as inline base64: an uploaded file's bytes, a base64 string or
    data URL, or OpenAI's `{"image_url": "data:..."}` (no URL is ever fetched)."""
    if isinstance(value, dict):
        if "file_id" in value:
            raise invalid("input_reference", "file ids are not supported: upload the image")
        unknown = sorted(set(value) - {"image_url"})
        if unknown or "image_url" not in value:
            raise invalid("input_reference", "takes an image file, a data URL or {image_url}")
        value = value["image_url"]
        if value.startswith(("http://", "https://")):
            raise invalid("input_reference", "must be a base64 data: URL (no URL is fetched)")
    if value is None:
        return None
    try:
        return inline_image_b64(value)
    except ValueError as exc:
        raise invalid("input_reference", str(exc)) from None


def build_video(
    options: VideoOptions,
    priority: str,
    image: str | None,
    request_id: str | None,
    *,
    registries: Registries,
) -> OmniRequest:
    """The validated VIDEO request, checked against `registries` (the app's); an
    image-to-video request without `size` takes the input image's (rounded as edits
    round it)."""
    fields = options.request_fields(priority)
    if image is not None:
        fields = {**input_size(base64.b64decode(image)), **fields, "image": image}
    names = dict(PARAM_NAMES)
    if options.seconds is not None and options.num_frames is None:
        names["num_frames"] = "seconds"  # the frame count came from `seconds`
    try:
        return create_video_request(options.prompt, request_id, registries=registries, **fields)
    except RequestValidationError as exc:
        raise request_error(exc, names) from None


class VideoRecord(JobRecord):
    """A video's job record: the job's fields and, in `extra`, the video's own."""

    def to_redis(self) -> dict[str, str]:
        return {**super().to_redis(), **self.extra}

    @property
    def model(self) -> str:
        return self.extra.get("video_model", "")

    @property
    def remixed_from(self) -> str | None:
        return self.extra.get("video_remixed_from") or None

    @property
    def seconds(self) -> str:
        return self.extra.get("video_seconds", "")

    def settings(self) -> dict[str, Any]:
        """The request's fields but its id, time and prompt: what a remix reuses."""
        return json.loads(self.extra.get("video_request") or "{}")

    @classmethod
    def of(cls, record: JobRecord) -> VideoRecord | None:
        """`record` as a video's, or None when it is not one."""
        if record.type != VIDEO or "video_model" not in record.extra:
            return None
        return cls(**vars(record))


def video_record(
    omni: OmniRequest,
    config: CoreModuleConfig,
    *,
    base_url: str,
    webhook_url: str | None = None,
    seconds: str | None = None,
    remixed_from: str | None = None,
) -> VideoRecord:
    """The record of the video `omni` makes; `seconds` as the client gave it (else the
    video's length)."""
    frames = omni.num_frames or DEFAULT_FRAMES
    settings = {k: v for k, v in omni.to_message().items() if k not in NOT_SETTINGS}
    extra = {
        "video_model": dit_model(omni, config),
        "video_seconds": seconds or f"{frames / omni.fps:g}",
        "video_size": f"{omni.width}x{omni.height}",
        "video_prompt": omni.prompt or "",
        "video_frames": str(frames),
        "video_fps": str(omni.fps),
        "video_request": json.dumps(settings, separators=(",", ":")),
    }
    if remixed_from:
        extra["video_remixed_from"] = remixed_from
    return VideoRecord(
        id=omni.request_id,
        type=VIDEO,
        created_at=omni.created_at,
        base_url=base_url,
        webhook_url=webhook_url,
        extra=extra,
    )


async def load_video(hub: ResultHub, video_id: str) -> VideoRecord | None:
    raw = await hub.redis.hgetall(hub.keys.api_job(video_id))
    return VideoRecord.of(JobRecord.from_redis(video_id, raw)) if raw else None


def video_view(
    record: VideoRecord, metas: list[dict[str, Any] | None], config: CoreModuleConfig
) -> dict[str, Any]:
    """OpenAI's video object, from the record and the job's task states; it expires
    `result_expires` after its creation."""
    expires_s, root = config.result_expires, output_root(config)
    job = job_view(record, metas, root)
    status = STATUSES[job["status"]]
    error = job["error"]
    extra = record.extra
    return {
        "id": record.id,
        "object": VIDEO,
        "status": status,
        "progress": _percent(status, progress_of(record, metas)),
        "created_at": int(record.created_at),
        "completed_at": _done_at(metas[-1]) if status in ENDED else None,
        "expires_at": int(record.created_at + expires_s),
        "model": record.model,
        "prompt": extra.get("video_prompt"),
        "seconds": record.seconds,
        "size": extra.get("video_size", ""),
        "error": {"code": error["code"], "message": error["message"]} if error else None,
        "remixed_from_video_id": record.remixed_from,
        "num_frames": int(extra.get("video_frames") or 0),
        "fps": int(extra.get("video_fps") or 0),
    }


def _percent(status: str, figures: dict[str, Any] | None) -> int:
    """0-100: the steps run of a running video (99 at most until it has completed)."""
    if status == "completed":
        return 100
    if status != "in_progress" or not figures or not figures.get("steps"):
        return 0
    return min(99, int(100 * figures.get("step", 0) / figures["steps"]))


def _done_at(meta: dict[str, Any] | None) -> int | None:
    """When the job ended: the result backend's `date_done`."""
    try:
        return int(datetime.fromisoformat(str((meta or {})["date_done"])).timestamp())
    except (KeyError, ValueError):
        return None


async def index_video(hub: ResultHub, record: JobRecord) -> None:
    """List the video in `GET /v1/videos` (again: a keyed repeat's is the same)."""
    await hub.redis.zadd(hub.keys.api_videos(), {record.id: record.created_at})


async def page_ids(
    hub: ResultHub, after: str | None, limit: int, order: Literal["asc", "desc"], kept_s: float
) -> tuple[list[str], bool]:
    """(up to `limit` video ids after `after` in `order`, whether more follow); 400
    naming `after` for an id the list does not hold. Videos older than `kept_s` leave
    the list."""
    redis, index = hub.redis, hub.keys.api_videos()
    pipe = redis.pipeline(transaction=False)
    pipe.zremrangebyscore(index, "-inf", f"({time.time() - kept_s}")
    if after is not None:
        pipe.zrevrank(index, after) if order == "desc" else pipe.zrank(index, after)
    found = await pipe.execute()
    start = 0
    if after is not None:
        if found[-1] is None:
            raise invalid("after", f"no video {after!r} in the list")
        start = int(found[-1]) + 1
    ids = await redis.zrange(index, start, start + limit, desc=order == "desc")
    return ids[:limit], len(ids) > limit
