"""OpenAI's Batch API: a JSONL file of requests run at the low priority class, with
an output file and an error file once every request has ended.

- `POST /v1/batches` (`input_file_id`, `endpoint`, `completion_window` "24h",
  `metadata`) -> the batch, `validating`; its input is checked and its requests
  submitted in the background (`batch_runner`). With an `Idempotency-Key` the batch
  id comes from the key: a retried create answers the same batch, submitted once.
- `GET /v1/batches/{id}` -> the batch (`validating`, `in_progress`, `finalizing`,
  `completed`, `failed`, `cancelling`, `cancelled`, `expired`), with `request_counts`;
  reading it also follows it (records what ended, finalizes it when all has).
- `POST /v1/batches/{id}/cancel` -> `cancelling`, then `cancelled` once what ran has
  ended; the output and error files hold what finished and what did not.
- `GET /v1/batches` (`limit`, `after`) -> the batches, newest first.

Lines may target `/v1/chat/completions`, `/v1/completions` and
`/v1/images/generations` (one batch may mix them; `endpoint` names the batch's main
one). Everything lives in Redis, so any API process serves any batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from omni_tasks.api.batch_files import list_body, store_of
from omni_tasks.api.batch_lines import ENDPOINTS
from omni_tasks.api.batch_runner import BatchRunner
from omni_tasks.api.batch_state import FILE_TTL_S, FINAL_STATUSES, MIN_FILE_TTL_S, batch_view
from omni_tasks.api.errors import APIError, invalid
from omni_tasks.api.files import base_url_of
from omni_tasks.api.idempotency import call_key, conflict

log = logging.getLogger(__name__)

COMPLETION_WINDOWS = {"24h": 86400}
MAX_METADATA = 16


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Every API process runs batches: its sweep moves on any batch in Redis."""
    runner = BatchRunner(app.state.hub, app.state.workers)
    app.state.batches = runner
    await runner.start()
    try:
        yield
    finally:
        await runner.stop()


router = APIRouter(lifespan=lifespan)


class ExpiresAfter(BaseModel):
    """How long the output and error files are kept, from their creation."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: int = Field(ge=MIN_FILE_TTL_S, le=FILE_TTL_S)


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: ExpiresAfter | None = None


def check_create(body: BatchCreate) -> None:
    """400 naming the field for what OpenAI refuses before a batch exists."""
    if body.endpoint not in ENDPOINTS:
        raise invalid("endpoint", f"must be one of {list(ENDPOINTS)}")
    if body.completion_window not in COMPLETION_WINDOWS:
        raise invalid("completion_window", f"must be one of {list(COMPLETION_WINDOWS)}")
    metadata = body.metadata or {}
    if len(metadata) > MAX_METADATA:
        raise invalid("metadata", f"at most {MAX_METADATA} keys")
    for key, value in metadata.items():
        if len(key) > 64 or len(value) > 512:
            raise invalid("metadata", "keys are at most 64 characters, values at most 512")


def batch_id_of(request: Request) -> str:
    """A new batch id, or, under an `Idempotency-Key`, the one the key names."""
    key = call_key(request)
    if key.base is None:
        return f"batch_{uuid.uuid4().hex}"
    return "batch_" + hashlib.sha256(key.base.encode()).hexdigest()[:32]


@router.post("/v1/batches")
async def create_batch(body: BatchCreate, request: Request) -> JSONResponse:
    store = store_of(request)
    check_create(body)
    found = await store.file(body.input_file_id)
    if found is None:
        message = f"no file {body.input_file_id!r}: upload it first (POST /v1/files)"
        raise APIError(404, message, param="input_file_id", code="file_not_found")
    if found["purpose"] != "batch":
        raise invalid("input_file_id", "the file's purpose must be batch")
    batch_id = batch_id_of(request)
    now = int(time.time())
    fields = {
        "id": batch_id,
        "status": "validating",
        "endpoint": body.endpoint,
        "input_file_id": body.input_file_id,
        "completion_window": body.completion_window,
        "created_at": str(now),
        "expires_at": str(now + COMPLETION_WINDOWS[body.completion_window]),
        "metadata": json.dumps(body.metadata) if body.metadata is not None else "",
        "base_url": base_url_of(request),
    }
    if body.output_expires_after is not None:
        fields["output_ttl"] = str(body.output_expires_after.seconds)
    if not await store.create_batch(batch_id, fields):
        existing = await store.batch(batch_id)
        same = ("endpoint", "input_file_id", "completion_window")
        if existing is None or any(existing.get(k) != fields[k] for k in same):
            raise conflict()
    else:
        request.app.state.batches.launch_soon(batch_id)
    return JSONResponse(await read_batch(request, batch_id))


async def read_batch(request: Request, batch_id: str) -> dict:
    store = store_of(request)
    raw = await store.batch(batch_id)
    if raw is None:
        raise APIError(404, f"no batch {batch_id!r}", param="batch_id", code="batch_not_found")
    return batch_view(raw, await store.counts(batch_id, raw))


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request) -> JSONResponse:
    try:
        await request.app.state.batches.refresh(batch_id)
    except Exception:  # the sweep follows it; the batch is still answered
        log.warning("batch %s: following it failed", batch_id, exc_info=True)
    return JSONResponse(await read_batch(request, batch_id))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request) -> JSONResponse:
    runner: BatchRunner = request.app.state.batches
    current = await read_batch(request, batch_id)
    status = current["status"]
    if status in FINAL_STATUSES - {"cancelled"} or status == "finalizing":
        message = f"batch {batch_id} is {status}: only a running batch can be cancelled"
        raise APIError(
            409, message, code="batch_not_cancellable", headers={"x-should-retry": "false"}
        )
    if not await runner.stop_batch(batch_id, "cancelled"):
        return JSONResponse(await read_batch(request, batch_id))
    await runner.refresh(batch_id)
    return JSONResponse(await read_batch(request, batch_id))


@router.get("/v1/batches")
async def list_batches(
    request: Request,
    limit: int = Query(20, ge=1, le=100),
    after: str | None = None,
) -> JSONResponse:
    store = store_of(request)

    async def view(batch_id: str) -> dict | None:
        raw = await store.batch(batch_id)
        return batch_view(raw, await store.counts(batch_id, raw)) if raw else None

    found, more = await store.page(store.keys.api_batches(), view, limit, after)
    return JSONResponse(list_body(found, more))
