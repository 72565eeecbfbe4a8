"""A batch line's outcome from its requests' states in the result backend: the line of
the output file (it succeeded: the same body the endpoint answers) or of the error
file (it failed: the endpoint's error body and status; or it never ran, cancelled or
expired with its batch), in OpenAI's shape:

    {"id": "batch_req_…", "custom_id": …, "response": {"status_code", "request_id",
     "body"} | null, "error": {"code", "message"} | null}
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

from omni_tasks.api.errors import APIError, from_failure
from omni_tasks.api.files import file_url, image_b64, image_name
from omni_tasks.api.hub import is_final
from omni_tasks.api.job_state import RUNNING_STATES
from omni_tasks.api.openai_text import completion_answer

Kind = Literal["output", "error"]
#: How a batch that stops early calls the lines it never ran.
ENDINGS = {"cancelled": "batch_cancelled", "expired": "batch_expired"}


def line_id(batch_id: str, index: int) -> str:
    digest = hashlib.sha256(f"{batch_id}:{index}".encode()).hexdigest()
    return f"batch_req_{digest[:32]}"


def result_line(
    batch_id: str,
    index: int,
    record: dict[str, Any],
    response: dict[str, Any] | None,
    error: dict[str, Any] | None = None,
) -> str:
    line = {"id": line_id(batch_id, index), "custom_id": record["custom_id"]}
    line.update(response=response, error=error)
    return json.dumps(line, separators=(",", ":"))


def response_of(status: int, request_id: str | None, body: dict[str, Any]) -> dict[str, Any]:
    return {"status_code": status, "request_id": request_id, "body": body}


def refused_line(batch_id: str, index: int, record: dict[str, Any], exc: APIError) -> str:
    """The error line of a line whose body the endpoint refuses (nothing ran)."""
    return result_line(batch_id, index, record, response_of(exc.status, None, exc.body()))


def ended_line(batch_id: str, index: int, record: dict[str, Any], ending: str) -> str:
    """The error line of a line its batch stopped before it ran (`ending`)."""
    code = ENDINGS[ending]
    message = f"the batch was {ending} before this request completed"
    return result_line(batch_id, index, record, None, {"code": code, "message": message})


async def outcome(
    batch_id: str,
    index: int,
    record: dict[str, Any],
    metas: list[dict[str, Any] | None],
    ending: str | None,
    waited_out: bool,
    base_url: str,
    root: Path,
) -> tuple[Kind, str] | None:
    """The line's outcome, or None while it has to wait: a request of it is not final,
    and its batch runs on (or stops, but lets what already runs finish, until
    `waited_out`)."""
    if not all(is_final(m) for m in metas):
        if ending is None:
            return None
        running = any(m and m.get("status") in RUNNING_STATES for m in metas)
        if running and not waited_out:
            return None
        return "error", ended_line(batch_id, index, record, ending)
    ids = record["ids"]
    for request_id, meta in zip(ids, metas, strict=True):
        assert meta is not None
        if meta["status"] == "REVOKED" and ending is not None:
            return "error", ended_line(batch_id, index, record, ending)
        if meta["status"] != "SUCCESS":
            exc = from_failure(meta.get("result"), request_id)
            response = response_of(exc.status, request_id, exc.body())
            return "error", result_line(batch_id, index, record, response)
    try:
        body = await answer(record, [m["result"] for m in metas if m], base_url, root)
    except APIError as exc:
        response = response_of(exc.status, ids[0], exc.body())
        return "error", result_line(batch_id, index, record, response)
    response = response_of(200, ids[0], body)
    return "output", result_line(batch_id, index, record, response)


async def answer(
    record: dict[str, Any], results: list[dict[str, Any]], base_url: str, root: Path
) -> dict:
    """What the line's endpoint answers for these results (its images named under
    `root`, the output_dir)."""
    created = int(time.time())
    url = record["url"]
    if url != "/v1/images/generations":
        chat = url == "/v1/chat/completions"
        prefix = "chatcmpl" if chat else "cmpl"
        base = {"id": f"{prefix}-{record['ids'][0]}", "created": created}
        base["model"] = record.get("model")
        return completion_answer(base, results[0], chat)
    data = [await _image(record, result, base_url, root) for result in results]
    return {"created": created, "data": data, **record.get("describe", {})}


async def _image(record: dict[str, Any], result: dict[str, Any], base_url: str, root: Path) -> dict:
    path = result["image_path"]
    extra = {"revised_prompt": record.get("prompt"), "seed": result.get("seed")}
    output_format = record.get("output_format", "png")
    if record.get("response_format") == "url":
        return {"url": file_url(base_url, image_name(path, root), output_format), **extra}
    data = await image_b64(path, output_format, record.get("output_compression"))
    return {"b64_json": data, **extra}
