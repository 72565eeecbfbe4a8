"""OpenAI's speech endpoint on the speech pool, and the voices it speaks in.

- `POST /v1/audio/speech` (JSON: `model`, `input`, `voice`, `response_format`, `speed`,
  `stream_format`) -> one SPEECH request. The answer is the audio file, streamed as the
  worker speaks it (`stream_format: "audio"`, the default): the first sentence's bytes
  go out while the rest is made (a WAV's header then says its length is unknown, as
  streamed WAVs do). `stream_format: "sse"` sends `speech.audio.delta` events (base64
  audio) and ends with `speech.audio.done` and its `usage`. `voice` is a name of
  `speech.voices`, a speaker id ("2"), or `{"id": ...}` of either. Extras: `priority`,
  `sample_rate`, `seed`, `timeout_s`. `instructions` is refused: VITS takes none.
- `GET /v1/audio/voices`: the voices, with the speaker id each names.

The answer's `X-Request-Id` header names the request (`omni-tasks status`, Flower,
`cancel`). Bad fields answer 422, named (an unknown voice, format or speed), before anything is
enqueued; a model other than the speech pool's is 404. The response starts once the
first audio exists, so a request that fails before it answers with its error's status;
one that fails later ends its stream early (the sse stream sends an `error` event).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omni_tasks.api.context import config_of, keys_of, registries_of
from omni_tasks.api.errors import (
    APIError,
    body_error,
    from_failure,
    invalid,
    request_error,
    waited_too_long,
)
from omni_tasks.api.hub import is_final
from omni_tasks.api.sse import HEADERS, KEEPALIVE, event
from omni_tasks.api.submission import accept, priority_of, withdraw
from omni_tasks.api.text_chunks import follow_pieces
from omni_tasks.audio_fields import MAX_SPEECH_CHARS, MEDIA_TYPES
from omni_tasks.config import Registries
from omni_tasks.errors import RequestValidationError
from omni_tasks.requests import AudioFormat, OmniRequest, create_speech_request

router = APIRouter()

#: Every field error of this endpoint is a 422, as the speech endpoints of OpenAI-style
#: servers answer them.
UNPROCESSABLE = 422


def unprocessable(error: APIError) -> APIError:
    """A field error of this endpoint, as 422."""
    error.status = UNPROCESSABLE
    return error


class VoiceRef(BaseModel):
    """OpenAI's custom-voice form: `{"id": ...}`."""

    model_config = ConfigDict(extra="forbid")
    id: str


class SpeechBody(BaseModel):
    """The body of `POST /v1/audio/speech`."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str = Field(max_length=MAX_SPEECH_CHARS)
    voice: str | VoiceRef
    response_format: AudioFormat = "mp3"
    speed: float = 1.0
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: str | None = None
    priority: Literal["high", "normal", "low"] | None = None
    sample_rate: int | None = None
    seed: int | None = None
    timeout_s: float | None = None

    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice

    def to_request(self, priority: str, registries: Registries) -> OmniRequest:
        """The SPEECH request this body asks for, streamed, checked against `registries`
        (the app's; 422 naming a bad field)."""
        if self.instructions:
            raise invalid("instructions", "this model takes no instructions", UNPROCESSABLE)
        fields: dict[str, Any] = {
            "voice": self.voice_name(),
            "speed": self.speed,
            "response_format": self.response_format,
            "priority": priority,
            "stream": True,
        }
        extras = {"sample_rate": self.sample_rate, "seed": self.seed, "timeout_s": self.timeout_s}
        fields.update({k: v for k, v in extras.items() if v is not None})
        try:
            return create_speech_request(self.input, registries=registries, **fields)
        except RequestValidationError as exc:
            raise unprocessable(request_error(exc)) from None


async def _body(request: Request) -> SpeechBody:
    try:
        return SpeechBody.model_validate(await request.json())
    except ValidationError as exc:
        raise unprocessable(body_error(exc.errors())) from None
    except ValueError as exc:  # not JSON
        raise APIError(400, f"the body is not valid JSON: {exc}", code="bad_json") from None


@router.post("/v1/audio/speech")
async def speech(request: Request) -> Response:
    body, config = await _body(request), config_of(request)
    served = config.speech.model
    if body.model != served:
        raise APIError(
            404,
            f"model {body.model!r} is not served here; the speech pool serves {served!r}",
            param="model",
            code="model_not_found",
        )
    priority = priority_of(body.priority, request.headers.get("x-priority"))
    omni = body.to_request(priority, registries_of(request))
    app = request.app.state
    try:
        await accept(app.workers, omni)
    except RequestValidationError as exc:  # the voice, checked against the config
        raise unprocessable(request_error(exc)) from None
    timeout_s = config.api.wait_timeout_s
    chunks = keys_of(request).audio_chunks(omni.request_id)
    pieces = follow_pieces(app.hub, omni.request_id, timeout_s, chunks)
    first = await _first_audio(pieces, omni, timeout_s)
    headers = {**HEADERS, "X-Request-Id": omni.request_id}
    if body.stream_format == "sse":
        return StreamingResponse(
            _sse(first, pieces), media_type="text/event-stream", headers=headers
        )
    return StreamingResponse(
        _audio(first, pieces), media_type=MEDIA_TYPES[body.response_format], headers=headers
    )


async def _first_audio(
    pieces: AsyncIterator[tuple[str, Any]], omni: OmniRequest, timeout_s: float
) -> bytes:
    """The request's first audio bytes, once they exist; its error as the answer when it
    ends without any (failed, cancelled, or no result within `timeout_s`)."""
    async for what, found in pieces:
        if what == "piece":
            return base64.b64decode(found["b"])
        if what == "end":
            raise await _ended(found, omni, timeout_s)
    raise APIError(500, f"request {omni.request_id}: its stream ended without a state")


async def _ended(meta: dict[str, Any] | None, omni: OmniRequest, timeout_s: float) -> APIError:
    """The answer to a request whose stream ended before any audio."""
    if meta is None or not is_final(meta):
        await withdraw(omni.request_id, omni.request_type)
        return waited_too_long(timeout_s, [omni.request_id])
    if meta["status"] != "SUCCESS":
        return from_failure(meta.get("result"), omni.request_id)
    return APIError(500, f"request {omni.request_id} finished without streaming its audio")


async def _audio(first: bytes, pieces: AsyncIterator[tuple[str, Any]]) -> AsyncIterator[bytes]:
    """The file's bytes as they are written; a failure after the first ends it early."""
    yield first
    async for what, found in pieces:
        if what == "piece":
            yield base64.b64decode(found["b"])


async def _sse(first: bytes, pieces: AsyncIterator[tuple[str, Any]]) -> AsyncIterator[bytes]:
    """`speech.audio.delta` per piece, then `speech.audio.done` with the usage (input
    tokens: the input's characters, which VITS reads one by one; output tokens: the
    pieces spoken), or an `error` event."""
    yield _delta(first)
    meta: dict[str, Any] | None = None
    async for what, found in pieces:
        if what == "piece":
            yield _delta(base64.b64decode(found["b"]))
        elif what == "wait":
            yield KEEPALIVE
        else:
            meta = found
    if meta is None or meta.get("status") != "SUCCESS":
        status = (meta or {}).get("status", "PENDING")
        error = {"message": f"the request ended {status}", "type": "server_error"}
        yield event(None, {"type": "error", "error": error})
        return
    result = meta["result"]
    used, spoken = int(result.get("input_chars", 0)), int(result.get("chunks", 0))
    usage = {"input_tokens": used, "output_tokens": spoken, "total_tokens": used + spoken}
    yield event(None, {"type": "speech.audio.done", "usage": usage})


def _delta(data: bytes) -> bytes:
    audio = base64.b64encode(data).decode("ascii")
    return event(None, {"type": "speech.audio.delta", "audio": audio})


@router.get("/v1/audio/voices")
async def voices(request: Request) -> JSONResponse:
    """The speech pool's voices: name -> the model's speaker id."""
    speech = config_of(request).speech
    data = [
        {"object": "voice", "id": name, "name": name, "speaker_id": speaker, "model": speech.model}
        for name, speaker in speech.voices.items()
    ]
    return JSONResponse(
        {"object": "list", "data": data, "default": speech.voice_name(), "model": speech.model}
    )
