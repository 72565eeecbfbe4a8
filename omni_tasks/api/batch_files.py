"""OpenAI's file endpoints, for the Batch API's input and output files, kept in Redis
(`batch_state`) so any API process serves them.

- `POST /v1/files` (multipart: `file`, `purpose=batch`, optional
  `expires_after[anchor]=created_at` and `expires_after[seconds]`) -> the file object.
  UTF-8 text only (a batch file is JSONL); the body limit (`api.max_body_mb`) bounds it.
- `GET /v1/files` (`purpose`, `limit`, `after`, `order`), `GET /v1/files/{id}`,
  `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`.

These ids start with `file-`; the generated images the diffusion workers write
(`files.py`) are served under the same prefix by their names, which never do: a name
that is not a file id goes on to them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from omni_tasks.api import files
from omni_tasks.api.batch_state import FILE_TTL_S, MIN_FILE_TTL_S, BatchStore
from omni_tasks.api.errors import APIError, invalid

router = APIRouter()

FILE_PREFIX = "file-"
PURPOSES = ("batch",)


def store_of(request: Request) -> BatchStore:
    """This process's `BatchStore` (made once, over the hub's client and keys)."""
    state = request.app.state
    store = getattr(state, "batch_store", None)
    if store is None:
        store = state.batch_store = BatchStore(state.hub.redis, state.hub.keys)
    return store


def not_found(file_id: str) -> APIError:
    return APIError(404, f"no file {file_id!r}", param="file_id", code="file_not_found")


def ttl_of(fields: dict[str, Any]) -> int:
    """The file's lifetime from `expires_after[...]` (default `FILE_TTL_S`)."""
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return FILE_TTL_S
    if anchor != "created_at":
        raise invalid("expires_after.anchor", "must be created_at")
    if not isinstance(seconds, str) or not seconds.isdigit():
        raise invalid("expires_after.seconds", "must be a whole number of seconds")
    if not MIN_FILE_TTL_S <= int(seconds) <= FILE_TTL_S:
        raise invalid("expires_after.seconds", f"must be {MIN_FILE_TTL_S} to {FILE_TTL_S}")
    return int(seconds)


@router.post("/v1/files")
async def upload(request: Request) -> JSONResponse:
    form = await request.form()
    given = form.get("file")
    fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
    if not isinstance(given, UploadFile):
        raise invalid("file", "a file is required (the multipart field `file`)")
    purpose = fields.get("purpose")
    if purpose not in PURPOSES:
        raise invalid("purpose", f"must be one of {list(PURPOSES)}: files here feed batches")
    ttl = ttl_of(fields)
    data = await given.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("file", "must be UTF-8 text: a JSONL file of requests") from None
    stored = await store_of(request).put_file(text, given.filename or "input.jsonl", purpose, ttl)
    return JSONResponse(stored)


@router.get("/v1/files")
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int = Query(10000, ge=1, le=10000),
    after: str | None = None,
    order: str = Query("desc", pattern="^(asc|desc)$"),
) -> JSONResponse:
    store = store_of(request)
    found, more = await store.page(store.keys.api_files(), store.file, limit, after, order, purpose)
    return JSONResponse(list_body(found, more))


def list_body(found: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    first = found[0]["id"] if found else None
    last = found[-1]["id"] if found else None
    return {"object": "list", "data": found, "first_id": first, "last_id": last, "has_more": more}


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request) -> Response:
    if not file_id.startswith(FILE_PREFIX):
        return await files.get_file(file_id, request)
    found = await store_of(request).file(file_id)
    if found is None:
        raise not_found(file_id)
    return JSONResponse(found)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> Response:
    if not file_id.startswith(FILE_PREFIX):
        return await files.get_file(f"{file_id}/content", request)
    content = await store_of(request).content(file_id)
    if content is None:
        raise not_found(file_id)
    return Response(content.encode(), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> JSONResponse:
    if not await store_of(request).delete_file(file_id):
        raise not_found(file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})
