"""A job as clients see it, from what Redis holds: the job record the API wrote when it
accepted the request, and the result backend's state of each of its tasks.

Status: `queued` (nothing started), `running` (started, reporting progress, or between
the two stages of a MULTIMODAL request), `succeeded`, `failed`, `cancelled`, `expired`
(past its timeout, running or not yet started). Any API process computes the same view.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_tasks.api.errors import FAILURE_STATUS, APIError, error_body, failure_of
from omni_tasks.api.files import audio_url, file_url, image_name
from omni_tasks.api.hub import ResultHub, is_final
from omni_tasks.requests import RequestType
from omni_tasks.tasks.definitions import task_ids_of

FINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
#: The job types whose text is streamed to `/v1/jobs/{id}/events` (by default).
STREAMED = ("text", "chat")
#: What the timeouts of a request raise, on the worker or as Celery's own limits.
TIMEOUT_ERRORS = frozenset({"RequestTimeoutError", "TimeLimitExceeded", "SoftTimeLimitExceeded"})
RUNNING_STATES = frozenset({"STARTED", "PROGRESS", "RETRY"})


@dataclass
class JobRecord:
    """What the API keeps of a job it accepted (`KeySpace.api_job`)."""

    id: str
    type: str
    created_at: float
    base_url: str = ""
    webhook_url: str | None = None
    partial_images: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def request_type(self) -> RequestType | None:
        try:
            return RequestType(self.type)
        except ValueError:
            return RequestType.TEXT  # a probe runs as a TEXT request

    @property
    def task_ids(self) -> list[str]:
        return task_ids_of(self.id, self.request_type)

    def to_redis(self) -> dict[str, str]:
        data = {
            "type": self.type,
            "created_at": repr(self.created_at),
            "base_url": self.base_url,
            "partial_images": str(self.partial_images),
        }
        if self.webhook_url:
            data["webhook_url"] = self.webhook_url
        return data

    @classmethod
    def from_redis(cls, job_id: str, raw: dict[str, str]) -> JobRecord:
        known = {"type", "created_at", "base_url", "webhook_url", "partial_images"}
        return cls(
            id=job_id,
            type=raw.get("type", "text"),
            created_at=float(raw.get("created_at") or time.time()),
            base_url=raw.get("base_url", ""),
            webhook_url=raw.get("webhook_url"),
            partial_images=int(raw.get("partial_images") or 0),
            extra={k: v for k, v in raw.items() if k not in known},
        )


async def load_record(hub: ResultHub, job_id: str) -> JobRecord | None:
    raw = await hub.redis.hgetall(hub.keys.api_job(job_id))
    return JobRecord.from_redis(job_id, raw) if raw else None


def status_of(metas: list[dict[str, Any] | None]) -> tuple[str, dict[str, Any] | None]:
    """(status, the final state if any) of a job from its tasks' states, in stage order."""
    final = metas[-1]
    for meta in (final, *metas[:-1]):
        if is_final(meta) and (meta is final or meta["status"] != "SUCCESS"):  # type: ignore[index]
            return _final_status(meta), meta  # type: ignore[arg-type]
    if any(m and m.get("status") in RUNNING_STATES for m in metas):
        return "running", None
    if len(metas) > 1 and any(m and m.get("status") == "SUCCESS" for m in metas[:-1]):
        return "running", None  # between two stages
    return "queued", None


def _final_status(meta: dict[str, Any]) -> str:
    state = meta.get("status")
    if state == "SUCCESS":
        return "succeeded"
    exc_type, message = failure_of(meta.get("result"))
    if state == "REVOKED":
        return "expired" if "expired" in message else "cancelled"
    return "expired" if exc_type in TIMEOUT_ERRORS else "failed"


def progress_of(record: JobRecord, metas: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The latest figures of the running stage: `step`/`steps` or `tokens`/`max_tokens`
    (with `stage` for a MULTIMODAL request)."""
    for index in range(len(metas) - 1, -1, -1):
        meta = metas[index]
        if meta and meta.get("status") == "PROGRESS" and isinstance(meta.get("result"), dict):
            figures = dict(meta["result"])
            if len(metas) > 1:
                figures["stage"] = ("ar", "dit")[index]
            return figures
    return None


#: A video result's files -> the variant of `/v1/videos/{id}/content` that serves each:
#: views link them (`<variant>_url`) rather than show the workers' paths.
VIDEO_FILES = {
    "video_path": "video",
    "thumbnail_path": "thumbnail",
    "spritesheet_path": "spritesheet",
}


def content_url(base_url: str, video_id: str, variant: str = "video") -> str:
    query = "" if variant == "video" else f"?variant={variant}"
    return f"{base_url.rstrip('/')}/v1/videos/{video_id}/content{query}"


def job_view(record: JobRecord, metas: list[dict[str, Any] | None], root: Path) -> dict[str, Any]:
    """The job object of `GET /v1/jobs/{id}`, SSE `result` events and webhooks."""
    status, final = status_of(metas)
    view: dict[str, Any] = {
        "id": record.id,
        "object": "job",
        "type": record.type,
        "status": status,
        "created_at": int(record.created_at),
        "progress": None if status in FINAL else progress_of(record, metas),
        "result": None,
        "error": None,
        "image_url": None,
    }
    if final is not None and status == "succeeded":
        result = dict(final.get("result") or {})
        path = result.pop("image_path", None)
        if path and record.base_url:
            view["image_url"] = _url_of(record.base_url, path, root)
        for field, variant in VIDEO_FILES.items():
            if result.pop(field, None) and record.base_url:
                view[f"{variant}_url"] = content_url(record.base_url, record.id, variant)
        audio = result.pop("audio_path", None)
        if audio and record.base_url:
            view["audio_url"] = audio_url(record.base_url, audio, root)
        view["result"] = result
    elif final is not None:
        view["error"] = _error_of(final, record.id)
    if record.webhook_url:
        view["webhook"] = {
            "url": record.webhook_url,
            "status": record.extra.get("webhook_status", "pending"),
            "attempts": int(record.extra.get("webhook_attempts", 0)),
        }
    return view


def _error_of(meta: dict[str, Any], job_id: str) -> dict[str, Any]:
    exc_type, message = failure_of(meta.get("result"))
    status, code = FAILURE_STATUS.get(exc_type, (500, "processing_error"))
    if meta.get("status") == "REVOKED":
        code = "expired" if "expired" in message else "cancelled"
    text = f"{exc_type}: {message}" if message else exc_type
    return error_body(status, f"job {job_id}: {text}", code=code)["error"]


def _url_of(base_url: str, image_path: str, root: Path) -> str | None:
    try:
        return file_url(base_url, image_name(image_path, root), "png")
    except APIError:  # not under this API's output_dir: the result still has the rest
        return None


async def read_view(hub: ResultHub, record: JobRecord, root: Path) -> dict[str, Any]:
    return job_view(record, await hub.metas(record.task_ids), root)
