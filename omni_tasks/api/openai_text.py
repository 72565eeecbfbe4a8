"""OpenAI's text endpoints on the AR pool, and the model list.

- `POST /v1/chat/completions`: one CHAT request; the worker renders the messages with
  its model's chat template (text content parts only).
- `POST /v1/completions`: one TEXT request, the prompt as it is.
- `GET /v1/models`: the models live workers serve, from their heartbeats.

`n`, `seed`, `stop`, `presence_penalty`, `frequency_penalty` and `logprobs` (with
`top_logprobs`; an integer on `/v1/completions`) go to the engine as vLLM takes them;
an AR pool on the transformers engine refuses the ones it cannot honour (400 naming
the field). Logprobs are in the answer, not in streamed chunks: asking for both is 400.

With an `Idempotency-Key` the request id comes from the key (`idempotency`): a retry
answers the same completion (its `id` too), generated once; a keyed call's 504 leaves
the request running for its retry.

With `stream: true` both answer OpenAI's chunks: the role at once, then the text as the
worker generates it (`text_chunks`), the finish reason, `usage` when
`stream_options.include_usage`, then `[DONE]`.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from omni_tasks.api.context import config_of, registries_of
from omni_tasks.api.errors import invalid, request_error
from omni_tasks.api.idempotency import KeyedCall, call_fingerprint, call_key
from omni_tasks.api.sse import streaming
from omni_tasks.api.submission import accept, priority_of
from omni_tasks.api.text_chunks import completion_answer, finished_result, text_chunks
from omni_tasks.config import Registries
from omni_tasks.errors import RequestValidationError
from omni_tasks.requests import (
    MAX_CHOICES,
    MAX_SEED,
    MAX_TOP_LOGPROBS,
    OmniRequest,
    create_chat_request,
    create_text_request,
)

router = APIRouter()
__all__ = ["ChatBody", "CompletionBody", "completion_answer", "router"]


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
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: Literal["high", "normal", "low"] | None = None
    timeout_s: float | None = None
    # Accepted as OpenAI clients send them; they change nothing here.
    metadata: dict[str, str] | None = None
    store: bool | None = None

    def fields(self, priority: str) -> dict[str, Any]:
        """The request fields this body sets (its sampling, priority and streaming)."""
        fields: dict[str, Any] = {"priority": priority, "model": self.model}
        newer = self.max_completion_tokens is not None  # OpenAI's newer name wins
        named = {
            "max_tokens": self.max_completion_tokens if newer else self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "timeout_s": self.timeout_s,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "n": self.n if self.n != 1 else None,
            "stream": self.stream or None,
        }
        fields.update({k: v for k, v in named.items() if v is not None})
        top = self.top_logprobs_asked()
        if top is not None:
            if self.stream:
                raise invalid("logprobs", "logprobs are not streamed: ask without stream")
            fields.update(logprobs=True, top_logprobs=top)
        return fields

    def top_logprobs_asked(self) -> int | None:
        """Alternatives per token when logprobs are asked for, else None."""
        return None

    def build(
        self,
        make: Any,
        given: Any,
        priority: str,
        request_id: str | None,
        registries: Registries,
    ) -> OmniRequest:
        """`make(given, request_id, **fields)` checked against `registries` (the app's),
        its errors named as the body names them."""
        try:
            return make(given, request_id, registries=registries, **self.fields(priority))
        except RequestValidationError as exc:
            newer = self.max_completion_tokens is not None
            given_name = "max_completion_tokens" if newer else "max_tokens"
            raise request_error(exc, {"max_tokens": given_name}) from None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatBody(TextOptions):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def top_logprobs_asked(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs", "needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def to_request(
        self, priority: str, request_id: str | None = None, *, registries: Registries
    ) -> OmniRequest:
        """The request this body asks for, checked against `registries` (the app's; 400
        naming a bad field)."""
        messages = chat_messages(self.messages)
        return self.build(create_chat_request, messages, priority, request_id, registries)


class CompletionBody(TextOptions):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API's top count

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    def to_request(
        self, priority: str, request_id: str | None = None, *, registries: Registries
    ) -> OmniRequest:
        """The request this body asks for, checked against `registries` (the app's; 400
        naming a bad field)."""
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise invalid("prompt", "one prompt per request")
            prompt = prompt[0]
        return self.build(create_text_request, prompt, priority, request_id, registries)


def chat_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """The messages as a chat request takes them: text content (parts joined)."""
    found = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = [p.get("text") for p in content if p.get("type") == "text"]
            if len(texts) != len(content):
                raise invalid(f"messages.{i}.content", "only text parts are supported")
            content = "\n".join(str(t) for t in texts)
        entry = {"role": message.role, "content": content or ""}
        if message.name:
            entry["name"] = message.name
        found.append(entry)
    return found


async def _serve(request: Request, body: ChatBody | CompletionBody, chat: bool) -> Response:
    state, config = request.app.state, config_of(request)
    priority = priority_of(body.priority, request.headers.get("x-priority"))
    key = call_key(request)
    omni = body.to_request(priority, key.request_id(), registries=registries_of(request))
    fingerprint = call_fingerprint(
        "chat" if chat else "completions", [omni], body.model_dump(mode="json")
    )
    async with KeyedCall(state.hub, key, fingerprint, config.result_expires) as call:
        await accept(state.workers, omni, model=body.model)
        call.accepted = True
    prefix = "chatcmpl" if chat else "cmpl"
    base = {"id": f"{prefix}-{omni.request_id}", "created": int(omni.created_at)}
    base["model"] = body.model
    kept = key.base is not None
    timeout_s = config.api.wait_timeout_s
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return streaming(text_chunks(state.hub, omni, base, chat, usage, timeout_s, kept))
    result = await finished_result(state.hub, omni, kept, timeout_s)
    return JSONResponse(completion_answer(base, result, chat))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, request: Request) -> Response:
    return await _serve(request, body, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request) -> Response:
    return await _serve(request, body, chat=False)


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    served, config = await request.app.state.workers.models(), config_of(request)
    data = [
        {
            "id": model,
            "object": "model",
            "created": info["created"],
            "owned_by": "omni-tasks",
            "pool": config.pool_for(info["stage"]).queue,
        }
        for model, info in sorted(served.items())
    ]
    return JSONResponse({"object": "list", "data": data})
