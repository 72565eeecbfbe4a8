"""OpenAI's text endpoints on the AR pool, and the model list.

- `POST /v1/chat/completions`: the messages become one prompt ("role: content" lines,
  then "assistant:"; the AR pool takes a prompt, and its model's chat template is not
  applied), one TEXT request.
- `POST /v1/completions`: the prompt as it is.
- `GET /v1/models`: the models live workers serve, from their heartbeats.

With an `Idempotency-Key` the request id comes from the key (`idempotency`): a retry
answers the same completion (its `id` too), generated once; a keyed call's 504 leaves
the request running for its retry.

With `stream: true` both answer OpenAI's chunks: the role at once, the text when the
request ends (AR workers report token counts while they run, not text), the finish
reason, `usage` when `stream_options.include_usage`, then `[DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from omni_tasks.api.errors import from_failure, invalid, request_error, waited_too_long
from omni_tasks.api.hub import ResultHub
from omni_tasks.api.idempotency import KeyedCall, call_fingerprint, call_key
from omni_tasks.api.sse import KEEPALIVE, event, streaming
from omni_tasks.api.submission import accept, priority_of, withdraw
from omni_tasks.config import get_config
from omni_tasks.errors import RequestValidationError
from omni_tasks.requests import MAX_SEED, OmniRequest, create_text_request

router = APIRouter()
STREAM_WAIT_S = 15.0


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextOptions(BaseModel):
    """What both text endpoints take besides their prompt."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: Literal["high", "normal", "low"] | None = None
    timeout_s: float | None = None
    # Accepted as OpenAI clients send them; they change nothing here.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    def request(self, prompt: str, priority: str, request_id: str | None = None) -> OmniRequest:
        fields: dict[str, Any] = {"priority": priority, "model": self.model}
        newer = self.max_completion_tokens is not None  # OpenAI's newer name wins
        limit = self.max_completion_tokens if newer else self.max_tokens
        named = {
            "max_tokens": limit,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "timeout_s": self.timeout_s,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
        }
        fields.update({k: v for k, v in named.items() if v is not None})
        try:
            return create_text_request(prompt, request_id, **fields)
        except RequestValidationError as exc:
            given = "max_completion_tokens" if newer else "max_tokens"
            raise request_error(exc, {"max_tokens": given}) from None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatBody(TextOptions):
    messages: list[Message] = Field(min_length=1)

    def to_request(self, priority: str, request_id: str | None = None) -> OmniRequest:
        """The request this body asks for (400 naming a bad field)."""
        return self.request(chat_prompt(self.messages), priority, request_id)


class CompletionBody(TextOptions):
    prompt: str | list[str]

    def to_request(self, priority: str, request_id: str | None = None) -> OmniRequest:
        """The request this body asks for (400 naming a bad field)."""
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise invalid("prompt", "one prompt per request")
            prompt = prompt[0]
        return self.request(prompt, priority, request_id)


def chat_prompt(messages: list[Message]) -> str:
    """The transcript the AR pool completes: one "role: content" line per message."""
    lines = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = [p.get("text") for p in content if p.get("type") == "text"]
            if len(texts) != len(content):
                raise invalid(f"messages.{i}.content", "only text parts are supported")
            content = "\n".join(str(t) for t in texts)
        lines.append(f"{message.role}: {content or ''}")
    return "\n".join(lines) + "\nassistant:"


async def _finished(hub: ResultHub, omni: OmniRequest, kept: bool) -> dict[str, Any]:
    """The request's result JSON; 504 after `api.wait_timeout_s`, with the request
    cancelled, or left to run for the retry of a keyed call (`kept`)."""
    timeout_s = get_config().api.wait_timeout_s
    meta = await hub.wait(omni.request_id, timeout_s)
    if meta is None:
        if not kept:
            await withdraw(omni.request_id, omni.request_type)
        raise waited_too_long(timeout_s, [omni.request_id], kept)
    if meta["status"] != "SUCCESS":
        raise from_failure(meta.get("result"), omni.request_id)
    return dict(meta["result"])


async def _serve(request: Request, body: ChatBody | CompletionBody, chat: bool) -> Response:
    state = request.app.state
    priority = priority_of(body.priority, request.headers.get("x-priority"))
    key = call_key(request)
    omni = body.to_request(priority, key.request_id())
    fingerprint = call_fingerprint(
        "chat" if chat else "completions", [omni], body.model_dump(mode="json")
    )
    async with KeyedCall(state.hub.redis, key, fingerprint) as call:
        await accept(state.workers, omni, model=body.model)
        call.accepted = True
    prefix = "chatcmpl" if chat else "cmpl"
    base = {"id": f"{prefix}-{omni.request_id}", "created": int(omni.created_at)}
    base["model"] = body.model
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        kept = key.base is not None
        return streaming(_chunks(state.hub, omni, base, chat, usage, kept))
    result = await _finished(state.hub, omni, key.base is not None)
    return JSONResponse(completion_answer(base, result, chat))


def completion_answer(base: dict[str, Any], result: dict[str, Any], chat: bool) -> dict[str, Any]:
    """OpenAI's (chat) completion object for a text result; `base` holds its `id`,
    `created` and `model`."""
    kind = "chat.completion" if chat else "text_completion"
    choice: dict[str, Any] = {"index": 0, "finish_reason": result["finish_reason"]}
    choice["logprobs"] = None
    if chat:
        choice["message"] = {"role": "assistant", "content": result["text"]}
    else:
        choice["text"] = result["text"]
    return {**base, "object": kind, "choices": [choice], "usage": result["usage"]}


async def _chunks(
    hub: ResultHub,
    omni: OmniRequest,
    base: dict[str, Any],
    chat: bool,
    usage: bool,
    kept: bool = False,
) -> AsyncIterator[bytes]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, role: bool = False) -> bytes:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = {"role": "assistant", "content": ""} if role else {}
            if delta is not None:
                choice["delta"]["content"] = delta
        else:
            choice["text"] = delta or ""
        return event(None, {**base, "object": kind, "choices": [choice]})

    if chat:
        yield chunk(None, None, role=True)
    timeout_s = get_config().api.wait_timeout_s
    deadline = time.monotonic() + timeout_s
    meta = None
    while meta is None and time.monotonic() < deadline:
        meta = await hub.wait(omni.request_id, min(STREAM_WAIT_S, deadline - time.monotonic()))
        if meta is None:
            yield KEEPALIVE
    if meta is None:
        if not kept:
            await withdraw(omni.request_id, omni.request_type)
        yield event(None, waited_too_long(timeout_s, [omni.request_id], kept).body())
    elif meta["status"] != "SUCCESS":
        yield event(None, from_failure(meta.get("result"), omni.request_id).body())
    else:
        result = meta["result"]
        yield chunk(result["text"], None)
        yield chunk(None if chat else "", result["finish_reason"])
        if usage:
            yield event(None, {**base, "object": kind, "choices": [], "usage": result["usage"]})
    yield event(None, "[DONE]")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, request: Request) -> Response:
    return await _serve(request, body, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request) -> Response:
    return await _serve(request, body, chat=False)


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    served = await request.app.state.workers.models()
    data = [
        {
            "id": model,
            "object": "model",
            "created": info["created"],
            "owned_by": "omni-tasks",
            "pool": get_config().pool_for(info["stage"]).queue,
        }
        for model, info in sorted(served.items())
    ]
    return JSONResponse({"object": "list", "data": data})
