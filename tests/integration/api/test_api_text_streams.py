"""Text that streams while it is generated, and chat rendered with the model's template:
the official `openai` client against real vLLM workers and `omni-tasks api` processes,
the job API's `delta` events, and `omni_tasks.stream_text` from Python."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from api_support import ApiServer, api_factory  # noqa: F401

from omni_tasks import (
    app,
    create_chat_request,
    generate_chat,
    generate_text,
    stream_text,
)

STORY = [
    {"role": "system", "content": "You tell stories."},
    {"role": "user", "content": "Tell me a long story about a fox."},
]


@pytest.fixture(scope="module")
def apis(pools, api_factory) -> list[ApiServer]:  # noqa: F811
    return [api_factory(), api_factory()]


@pytest.fixture(scope="module")
def client(apis: list[ApiServer]) -> openai.OpenAI:
    return apis[0].openai()


def timed_stream(client: openai.OpenAI, **options: Any) -> tuple[list[Any], list[float]]:
    """The chunks of a streamed chat completion and when each came (seconds from the call)."""
    start = time.monotonic()
    chunks, times = [], []
    for chunk in client.chat.completions.create(stream=True, **options):
        chunks.append(chunk)
        times.append(time.monotonic() - start)
    return chunks, times


def test_streamed_chat_arrives_token_by_token_and_is_the_plain_answer(
    client: openai.OpenAI,
) -> None:
    """One content chunk per token (usage counts them), the first long before the
    generation is half done, and joined they are the plain answer for the same seed."""
    options = {"model": "tiny-llama", "messages": STORY, "max_tokens": 400, "seed": 5}
    options["temperature"] = 0.8
    chunks, times = timed_stream(client, stream_options={"include_usage": True}, **options)
    content = [
        (c, t)
        for c, t in zip(chunks, times, strict=True)
        if c.choices and c.choices[0].delta.content is not None
    ]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 400
    assert len(content) - 1 == usage.completion_tokens  # the role chunk carries ""
    assert len(content) >= 400 / 4
    first_text = next(t for c, t in content if c.choices[0].delta.content)
    assert first_text < times[-1] / 2, (first_text, times[-1])
    streamed = "".join(c.choices[0].delta.content for c, _ in content)
    plain = client.chat.completions.create(**options)
    assert streamed == plain.choices[0].message.content
    assert plain.usage == usage


def test_the_chat_template_renders_the_prompt(client: openai.OpenAI, tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rendered = tok.apply_chat_template(STORY, add_generation_prompt=True, tokenize=True)
    out = client.chat.completions.create(model="tiny-llama", messages=STORY, max_tokens=4)
    assert out.usage.prompt_tokens == len(rendered["input_ids"])
    plain = client.completions.create(model="tiny-llama", prompt="x", max_tokens=4)
    assert plain.usage.prompt_tokens == len(tok("x").input_ids)


def test_n_choices_and_logprobs_come_as_openai_gives_them(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="tiny-llama",
        messages=STORY,
        max_tokens=8,
        n=3,
        seed=11,
        logprobs=True,
        top_logprobs=2,
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == 24
    for choice in out.choices:
        entries = choice.logprobs.content
        assert len(entries) == 8
        assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
        assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in entries)
    legacy = client.completions.create(model="tiny-llama", prompt="Once", max_tokens=5, logprobs=3)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset[0] == 0 and all(len(top) == 3 for top in lp.top_logprobs)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny-llama", messages=STORY, stream=True, logprobs=True
        )
    assert refused.value.body["param"] == "logprobs"


def test_streamed_n_choices_each_join_to_their_answer(client: openai.OpenAI) -> None:
    options = {"model": "tiny-llama", "messages": STORY, "max_tokens": 16, "n": 2, "seed": 3}
    chunks, _ = timed_stream(client, **options)
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    plain = client.chat.completions.create(**options)
    assert texts == {c.index: c.message.content for c in plain.choices}


def test_fifty_concurrent_streams_through_two_api_processes_lose_nothing(
    apis: list[ApiServer],
) -> None:
    """Each stream's pieces, joined, are its request's stored text: none lost, none out
    of order, whichever API process served it."""
    clients = [api.openai() for api in apis]

    def one(i: int) -> tuple[str, str]:
        chunks = clients[i % 2].chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": f"Story {i}"}],
            max_tokens=48,
            temperature=1.0,
            stream=True,
        )
        pieces, request_id = [], ""
        for chunk in chunks:
            request_id = chunk.id.removeprefix("chatcmpl-")
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        return request_id, "".join(pieces)

    with ThreadPoolExecutor(50) as pool:
        streamed = list(pool.map(one, range(50)))
    assert len({rid for rid, _ in streamed}) == 50
    for request_id, text in streamed:
        stored = app.AsyncResult(request_id).get(timeout=60)
        assert text == stored["text"] and stored["usage"]["completion_tokens"] == 48


def test_job_events_carry_the_text_as_delta_events(apis: list[ApiServer]) -> None:
    with apis[1].client() as http:
        job = http.post("/v1/jobs", json={"type": "chat", "messages": STORY, "max_tokens": 32})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        deltas, result = [], None
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as events:
            name = None
            for line in events.iter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: ") and name == "delta":
                    deltas.append(json.loads(line.removeprefix("data: ")))
                elif line.startswith("data: ") and name == "result":
                    result = json.loads(line.removeprefix("data: "))
    assert result is not None and result["status"] == "succeeded"
    assert len(deltas) == 32 and {d["index"] for d in deltas} == {0}
    assert "".join(d["text"] for d in deltas) == result["result"]["text"]


def test_stream_text_follows_a_delay_and_submits_a_request(pools) -> None:
    sent = generate_text.delay(prompt="Once upon a time", max_tokens=40, stream=True)
    pieces = list(stream_text(sent, timeout_s=60))
    assert len(pieces) == 40 and {p.index for p in pieces} == {0}
    assert "".join(p.text for p in pieces) == sent.get(timeout=10)["text"]

    request = create_chat_request(STORY, max_tokens=20, temperature=0)
    chat = "".join(p.text for p in stream_text(request, timeout_s=60))
    assert chat == app.AsyncResult(request.request_id).get(timeout=10)["text"]

    quiet = generate_chat.delay(messages=STORY, max_tokens=10, temperature=0)  # not streamed
    whole = [p.text for p in stream_text(quiet.id, timeout_s=60)]
    assert whole == [quiet.get(timeout=10)["text"]] and chat.startswith(whole[0])
