"""OpenAI's text answers: a finished result as a (chat) completion object, and a streamed
request's pieces as the chunks of `stream: true`.

A streamed request's AR worker writes each step's new text to a Redis list and announces
it on the list's channel (`workers.text_stream`). The stream here waits on that channel
and on the result's own, reads the list from where it left off (one LRANGE per wake,
however many writes it slept through), and sends a chunk per piece. It reads the result's
state before the pieces: once the state is final, every piece is already in the list
(the worker writes its last ones before it stores the result), so none is lost, and
pieces are sent in the order they were written. Any API process can serve any stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from omni_tasks.api.errors import APIError, from_failure, waited_too_long
from omni_tasks.api.hub import ResultHub, is_final, meta_key, next_message
from omni_tasks.api.sse import KEEPALIVE, KEEPALIVE_S, event
from omni_tasks.api.submission import withdraw
from omni_tasks.requests import OmniRequest


async def finished_result(
    hub: ResultHub, omni: OmniRequest, kept: bool, timeout_s: float
) -> dict[str, Any]:
    """The request's result JSON; 504 after `timeout_s` (`api.wait_timeout_s`), with the
    request cancelled, or left to run for the retry of a keyed call (`kept`)."""
    meta = await hub.wait(omni.request_id, timeout_s)
    if meta is None:
        if not kept:
            await withdraw(omni.request_id, omni.request_type)
        raise waited_too_long(timeout_s, [omni.request_id], kept)
    if meta["status"] != "SUCCESS":
        raise from_failure(meta.get("result"), omni.request_id)
    return dict(meta["result"])


def result_choices(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every choice of a text result (one, unless it asked for `n` > 1 or logprobs)."""
    if result.get("choices"):
        return list(result["choices"])
    return [{"index": 0, "text": result["text"], "finish_reason": result["finish_reason"]}]


def completion_answer(base: dict[str, Any], result: dict[str, Any], chat: bool) -> dict[str, Any]:
    """OpenAI's (chat) completion object for a text result; `base` holds its `id`,
    `created` and `model`."""
    kind = "chat.completion" if chat else "text_completion"
    choices = []
    for found in result_choices(result):
        choice: dict[str, Any] = {"index": found["index"], "finish_reason": found["finish_reason"]}
        choice["logprobs"] = openai_logprobs(found.get("logprobs"), chat)
        if chat:
            choice["message"] = {"role": "assistant", "content": found["text"]}
        else:
            choice["text"] = found["text"]
        choices.append(choice)
    return {**base, "object": kind, "choices": choices, "usage": result["usage"]}


def openai_logprobs(entries: list[dict[str, Any]] | None, chat: bool) -> dict[str, Any] | None:
    """A choice's logprobs as each endpoint gives them: chat's `content` list, or the
    completions endpoint's parallel lists."""
    if entries is None:
        return None
    if chat:
        return {"content": entries, "refusal": None}
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


async def state_and_pieces(
    hub: ResultHub, request_id: str, start: int, key: str | None = None
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The result's state and the pieces ({i, t}; a speech request's {i, b}, in `key`)
    written from position `start` on, in one round trip, the state read first (once
    final, every piece is in). A list shorter than `start` was started again (its worker
    was lost, and the request runs anew): 409, since what was sent cannot be taken back."""
    key = key or hub.keys.text_deltas(request_id)
    pipe = hub.redis.pipeline(transaction=False)
    pipe.get(meta_key(request_id))
    pipe.lrange(key, start, -1)
    pipe.llen(key)
    raw_meta, raw, length = await pipe.execute()
    if length < start:
        raise APIError(
            409,
            f"request {request_id} started again after its worker was lost; its output "
            "restarted too: read its result",
            code="stream_restarted",
        )
    meta = json.loads(raw_meta) if raw_meta else None
    return meta, [json.loads(r) for r in raw]


class _Chunks:
    """The chunk objects of one streamed answer."""

    def __init__(self, base: dict[str, Any], chat: bool) -> None:
        self.base, self.chat = base, chat
        self.kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(self, index: int, text: str | None, finish: str | None = None, role: bool = False):
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                choice["delta"]["content"] = text
        else:
            choice["text"] = text or ""
        return event(None, {**self.base, "object": self.kind, "choices": [choice]})

    def usage(self, usage: dict[str, Any]) -> bytes:
        return event(None, {**self.base, "object": self.kind, "choices": [], "usage": usage})


async def text_chunks(
    hub: ResultHub,
    omni: OmniRequest,
    base: dict[str, Any],
    chat: bool,
    usage: bool,
    timeout_s: float,
    kept: bool = False,
) -> AsyncIterator[bytes]:
    """The answer of `stream: true`: the role, a chunk per piece as it is written, each
    choice's finish reason, `usage` if asked, then `[DONE]`."""
    chunks = _Chunks(base, chat)
    if chat:
        for index in range(omni.n):
            yield chunks.chunk(index, None, role=True)
    read, meta = 0, None
    try:
        async for what, found in follow_pieces(hub, omni.request_id, timeout_s):
            if what == "piece":
                read += 1
                yield chunks.chunk(int(found["i"]), found["t"])
            elif what == "wait":
                yield KEEPALIVE
            else:
                meta = found
    except APIError as exc:
        yield event(None, exc.body())
        yield event(None, "[DONE]")
        return
    if meta is None or not is_final(meta):
        if not kept:
            await withdraw(omni.request_id, omni.request_type)
        yield event(None, waited_too_long(timeout_s, [omni.request_id], kept).body())
    elif meta["status"] != "SUCCESS":
        yield event(None, from_failure(meta.get("result"), omni.request_id).body())
    else:
        result = meta["result"]
        for choice in result_choices(result):
            if read == 0 and choice["text"]:  # nothing was streamed (it expired, say)
                yield chunks.chunk(choice["index"], choice["text"])
            yield chunks.chunk(choice["index"], None if chat else "", choice["finish_reason"])
        if usage:
            yield chunks.usage(result["usage"])
    yield event(None, "[DONE]")


async def follow_pieces(
    hub: ResultHub, request_id: str, timeout_s: float, key: str | None = None
) -> AsyncIterator[tuple[str, Any]]:
    """("piece", piece) for each piece of the stream `key` (default: the request's text)
    in order, ("wait", None) when a keep-alive is due, and last ("end", the final state,
    or the state at `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    key = key or hub.keys.text_deltas(request_id)
    channels = [meta_key(request_id), key]
    read = 0
    async with hub.listen(channels) as queue:
        while True:
            meta, pieces = await state_and_pieces(hub, request_id, read, key)
            for piece in pieces:
                read += 1
                yield "piece", piece
            left = deadline - time.monotonic()
            if is_final(meta) or left <= 0:
                yield "end", meta
                return
            if await next_message(queue, min(KEEPALIVE_S, left)) is None:
                yield "wait", None
            while not queue.empty():  # one read for every write slept through
                queue.get_nowait()
