"""Following a text or speech request's output while it is made, from any process.

An AR worker writes the pieces of a streamed request (`stream=True`) to a Redis list
(`KeySpace.text_deltas`) and announces each write on the channel of the same name
(`workers.text_stream`). `stream_text` reads the list by position and waits on the
channel and on the result's own channel between reads, so it wakes on each write, never
on a timer, and it may start late: it reads from the first piece. It ends when the
result is final, with every piece read (the worker writes the last ones before it
stores the result), and raises the request's error if it failed. A speech worker
writes its audio the same way (`KeySpace.audio_chunks`), read by `stream_audio`.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from celery import states
from celery.result import AsyncResult

from omni_tasks.errors import ProcessingError, RequestTimeoutError
from omni_tasks.requests import OmniRequest
from omni_tasks.tasks.celery_app import app
from omni_tasks.tasks.context import producer_context
from omni_tasks.tasks.producer import submit

#: The longest wait between two looks at the result, should a wake-up be missed.
WAKE_S = 1.0


@dataclass(frozen=True)
class TextDelta:
    """A piece of new text of choice `index` (0 unless the request asked for `n` > 1)."""

    text: str
    index: int = 0


def stream_text(
    request: OmniRequest | AsyncResult | str, timeout_s: float | None = None
) -> Iterator[TextDelta]:
    """Yield the pieces of a text or chat request's output as they are generated.

    `request`: the result of `generate_text.delay(..., stream=True)` (or
    `generate_chat`), its id, or an `OmniRequest`, which is submitted with `stream` on
    (sent before under its id, it is a repeat and is not run twice). A request sent
    without `stream` yields its whole text once it ends. Raises the request's error if it
    failed, `RequestTimeoutError` after `timeout_s`.
    """
    if isinstance(request, OmniRequest):
        request = submit(request.model_copy(update={"stream": True}))
    request_id = request if isinstance(request, str) else str(request.id)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    key = producer_context(app).keys.text_deltas(request_id)
    read = 0
    for raw in _follow(request_id, key, deadline):
        read += 1
        yield _delta(raw)
    yield from _outcome(app.AsyncResult(request_id), read)


def stream_audio(
    request: OmniRequest | AsyncResult | str, timeout_s: float | None = None
) -> Iterator[bytes]:
    """Yield the bytes of a speech request's audio file as its worker makes them: their
    concatenation is the file (`response_format`; a WAV's header says its length is
    unknown, as streamed WAVs do).

    `request`: the result of `generate_speech.delay(..., stream=True)`, its id, or an
    `OmniRequest`, submitted with `stream` on. A request sent without `stream` yields
    nothing until it ends, then its file's bytes where this process can read the
    workers' `output_dir`. Raises the request's error if it failed, and
    `RequestTimeoutError` after `timeout_s`.
    """
    if isinstance(request, OmniRequest):
        request = submit(request.model_copy(update={"stream": True}))
    request_id = request if isinstance(request, str) else str(request.id)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    key = producer_context(app).keys.audio_chunks(request_id)
    read = 0
    for raw in _follow(request_id, key, deadline):
        read += 1
        yield base64.b64decode(json.loads(raw)["b"])
    result = _finished(app.AsyncResult(request_id))
    path = result.get("audio_path") if isinstance(result, dict) else None
    if read == 0 and path and os.path.exists(path):
        with open(path, "rb") as file:
            yield file.read()


def _follow(request_id: str, key: str, deadline: float | None) -> Iterator[str | bytes]:
    """The raw pieces of the list `key` (a request's stream), until its result is final."""
    client = producer_context(app).redis
    meta_key = app.backend.get_key_for_task(request_id)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(key, meta_key)
    read = 0
    try:
        while True:
            final, found = _look(client, meta_key, key, read)
            read += len(found)
            yield from found
            if final:
                return
            wait = WAKE_S if deadline is None else min(WAKE_S, deadline - time.monotonic())
            if wait <= 0:
                raise RequestTimeoutError(f"request {request_id}: no result in time")
            pubsub.get_message(timeout=wait)
            while pubsub.get_message(timeout=0) is not None:
                pass
    finally:
        pubsub.close()


def _look(client: Any, meta_key: Any, key: str, start: int) -> tuple[bool, list[Any]]:
    """Whether the result is final, and the pieces from `start` on, in one round trip:
    the state is read first, so once it is final every piece is in."""
    pipe = client.pipeline(transaction=False)
    pipe.get(meta_key)
    pipe.lrange(key, start, -1)
    pipe.llen(key)
    meta, found, length = pipe.execute()
    if length < start:
        raise ProcessingError(
            f"{key}: the request started again (its worker was lost), so its output "
            "did too; read its result"
        )
    status = json.loads(meta).get("status") if meta else None
    return status in states.READY_STATES, list(found)


def _delta(raw: str | bytes) -> TextDelta:
    data = json.loads(raw)
    return TextDelta(data["t"], int(data.get("i", 0)))


def _finished(result: AsyncResult) -> Any:
    """The final result's value, or the request's error raised."""
    result.maybe_throw()
    if result.state != states.SUCCESS:
        raise ProcessingError(f"request {result.id} ended {result.state}")
    return result.result


def _outcome(result: AsyncResult, read: int) -> Iterator[TextDelta]:
    """The end of the stream: the request's error, or (when nothing was streamed) its
    whole text."""
    value = _finished(result)
    if read == 0 and isinstance(value, dict):
        choices = value.get("choices") or [{"index": 0, "text": value.get("text", "")}]
        for choice in choices:
            if choice.get("text"):
                yield TextDelta(choice["text"], int(choice.get("index", 0)))
