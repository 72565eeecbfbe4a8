"""OpenAI's Batch API through the official `openai` client, unmodified, against real
workers and `omni-tasks api` processes: a JSONL file of text and image lines runs to
`completed` with one output line per `custom_id`; its requests run at the low class;
a cancelled batch ends `cancelled`; a batch outlives the API process that accepted
it; malformed input is refused, the whole batch or the line, clearly."""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

import httpx
import openai
import pytest
from api_support import ApiServer, api_factory  # noqa: F401
from helpers import KEYS, eventually
from PIL import Image

from omni_tasks.api.batch_lines import request_base
from omni_tasks.api.hub import meta_key
from omni_tasks.coordination.client import get_redis

CHAT = {"model": "tiny-llama", "max_tokens": 6, "temperature": 0}
#: An image that runs for a while on the tiny Flux model on a CPU.
LONG_IMAGE = {"prompt": "a slow castle", "size": "512x512", "num_inference_steps": 100}


@pytest.fixture(scope="module")
def api(pools, api_factory) -> ApiServer:  # noqa: F811
    return api_factory()


@pytest.fixture(scope="module")
def client(api: ApiServer) -> openai.OpenAI:
    return api.openai()


def line(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in lines).encode()


def upload(client: openai.OpenAI, lines: list[dict[str, Any]], name: str = "in.jsonl") -> str:
    return client.files.create(file=(name, jsonl(lines)), purpose="batch").id


def create(client: openai.OpenAI, file_id: str, endpoint: str = "/v1/chat/completions") -> Any:
    return client.batches.create(
        input_file_id=file_id, endpoint=endpoint, completion_window="24h", metadata={"t": "1"}
    )


def wait_for(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses or time.monotonic() > deadline:
            return batch
        time.sleep(0.5)


def file_lines(client: openai.OpenAI, file_id: str) -> dict[str, dict[str, Any]]:
    text = client.files.content(file_id).text
    found = [json.loads(row) for row in text.splitlines()]
    by_id = {item["custom_id"]: item for item in found}
    assert len(by_id) == len(found)
    return by_id


def priority_of(request_id: str) -> str | None:
    """The priority class a request was sent with: its ledger entry while it is open,
    else its result (the message's kwargs, kept with `result_extended`)."""
    redis = get_redis()
    kwargs = redis.hget(KEYS.ledger(request_id), "kwargs")
    if kwargs is None:
        meta = redis.get(meta_key(request_id))
        kwargs = json.dumps(json.loads(meta).get("kwargs") or {}) if meta else None
    return json.loads(kwargs).get("priority") if kwargs else None


def mixed_lines() -> list[dict[str, Any]]:
    chat = [
        line(
            f"chat-{i}",
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": f"Story {i}"}]},
        )
        for i in range(10)
    ]
    text = [
        line(f"text-{i}", "/v1/completions", {**CHAT, "prompt": f"Once upon {i}"}) for i in range(5)
    ]
    image = {"size": "64x48", "num_inference_steps": 2}
    images = [
        line(f"image-{i}", "/v1/images/generations", {**image, "prompt": f"a fox {i}", "seed": i})
        for i in range(3)
    ]
    images.append(
        line(
            "image-url",
            "/v1/images/generations",
            {**image, "prompt": "a lighthouse", "response_format": "url"},
        )
    )
    images.append(
        line(
            "image-two",
            "/v1/images/generations",
            {**image, "prompt": "two owls", "n": 2, "seed": 40},
        )
    )
    return chat + text + images


def test_a_batch_of_text_and_image_lines_completes(client: openai.OpenAI, api: ApiServer) -> None:
    lines = mixed_lines()
    assert len(lines) == 20
    file_id = upload(client, lines)
    stored = client.files.retrieve(file_id)
    assert stored.purpose == "batch" and stored.bytes == len(jsonl(lines))
    assert client.files.content(file_id).content == jsonl(lines)
    batch = create(client, file_id)
    assert batch.status == "validating" and batch.metadata == {"t": "1"}
    done = wait_for(client, batch.id, {"completed", "failed"}, 600)
    assert done.status == "completed", done
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (20, 20, 0)
    assert done.error_file_id is None and done.errors is None
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    output = file_lines(client, done.output_file_id)
    assert set(output) == {item["custom_id"] for item in lines}
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    for custom_id, item in output.items():
        assert item["id"].startswith("batch_req_") and item["error"] is None
        assert item["response"]["status_code"] == 200
        check_body(custom_id, item["response"]["body"], api)
    for index in range(20):  # every request ran at the low class
        assert priority_of(request_base(batch.id, index)) == "low"


def check_body(custom_id: str, body: dict[str, Any], api: ApiServer) -> None:
    """The line's body is what its endpoint answers."""
    if custom_id.startswith("chat-"):
        assert body["object"] == "chat.completion" and body["model"] == "tiny-llama"
        assert body["choices"][0]["message"]["content"]
        assert 1 <= body["usage"]["completion_tokens"] <= 6
    elif custom_id.startswith("text-"):
        assert body["object"] == "text_completion" and body["choices"][0]["text"]
    elif custom_id == "image-url":
        with api.client() as http:
            png = http.get(body["data"][0]["url"]).content
        assert Image.open(io.BytesIO(png)).size == (64, 48)
    else:
        assert len(body["data"]) == (2 if custom_id == "image-two" else 1)
        for item in body["data"]:
            image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
            assert image.format == "PNG" and image.size == (64, 48)
        assert body["size"] == "64x48"


def test_bad_lines_go_to_the_error_file_and_the_rest_runs(client: openai.OpenAI) -> None:
    lines = [
        line("good", "/v1/completions", {**CHAT, "prompt": "Hello"}),
        line("zero", "/v1/completions", {**CHAT, "prompt": "x", "max_tokens": 0}),
        line(
            "streamed",
            "/v1/chat/completions",
            {**CHAT, "stream": True, "messages": [{"role": "user", "content": "x"}]},
        ),
        line("unknown", "/v1/images/generations", {"prompt": "x", "colour": "red"}),
        line("model", "/v1/completions", {**CHAT, "model": "gpt-4", "prompt": "x"}),
    ]
    done = wait_for(client, create(client, upload(client, lines)).id, {"completed"}, 300)
    assert done.status == "completed", done
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (5, 1, 4)
    assert set(file_lines(client, done.output_file_id)) == {"good"}
    errors = file_lines(client, done.error_file_id)
    params = {key: item["response"]["body"]["error"]["param"] for key, item in errors.items()}
    assert params == {
        "zero": "max_tokens",
        "streamed": "stream",
        "unknown": "colour",
        "model": "model",
    }
    statuses = {key: item["response"]["status_code"] for key, item in errors.items()}
    assert statuses == {"zero": 400, "streamed": 400, "unknown": 400, "model": 404}
    with pytest.raises(openai.ConflictError):  # a completed batch cannot be cancelled
        client.batches.cancel(done.id)


def test_a_malformed_file_fails_the_batch_naming_its_lines(client: openai.OpenAI) -> None:
    good = json.dumps(line("a", "/v1/completions", {**CHAT, "prompt": "x"}))
    rows = [
        good,
        "{not json",
        json.dumps(line("b", "/v1/embeddings", {"input": "x"})),
        good,  # a custom_id again
        json.dumps({"custom_id": "c", "method": "GET", "url": "/v1/completions", "body": {}}),
    ]
    file_id = client.files.create(file=("bad.jsonl", "\n".join(rows).encode()), purpose="batch").id
    failed = wait_for(client, create(client, file_id, "/v1/completions").id, {"failed"}, 30)
    assert failed.status == "failed" and failed.failed_at
    found = [(e.line, e.code) for e in failed.errors.data]
    assert found == [
        (2, "invalid_json_line"),
        (3, "invalid_url"),
        (4, "duplicate_custom_id"),
        (5, "invalid_method"),
    ]
    assert failed.output_file_id is None and failed.request_counts.completed == 0


def test_bad_create_calls_are_refused_with_the_field_named(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    assert caught.value.body["param"] == "purpose"
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("x.bin", b"\xff\xfe\x00"), purpose="batch")
    assert caught.value.body["param"] == "file"
    file_id = upload(client, [line("a", "/v1/completions", {**CHAT, "prompt": "x"})])
    with pytest.raises(openai.BadRequestError) as caught:
        create(client, file_id, "/v1/embeddings")
    assert caught.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(
            input_file_id=file_id, endpoint="/v1/completions", completion_window="1h"
        )
    assert caught.value.body["param"] == "completion_window"
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/completions",
            completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 60},
        )
    assert caught.value.body["param"] == "output_expires_after.seconds"
    with pytest.raises(openai.NotFoundError) as caught:
        create(client, "file-doesnotexist")
    assert caught.value.body["param"] == "input_file_id"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    assert client.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)


def test_an_upload_over_the_body_limit_is_413(api_factory) -> None:  # noqa: F811
    small = api_factory(OMNI_API__MAX_BODY_MB="0.01")
    lines = [line(f"x-{i}", "/v1/completions", {**CHAT, "prompt": "x" * 100}) for i in range(100)]
    with pytest.raises(openai.APIStatusError) as caught:
        upload(small.openai(), lines)
    assert caught.value.status_code == 413


def test_image_names_are_still_served_under_files(api: ApiServer) -> None:
    with api.client() as http:
        missing = http.get("/v1/files/nothing-here.png")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "name"
        assert http.get("/v1/files/file-nothing").json()["error"]["param"] == "file_id"


def test_a_cancelled_batch_ends_cancelled(client: openai.OpenAI) -> None:
    lines = [
        line(f"long-{i}", "/v1/images/generations", {**LONG_IMAGE, "seed": i}) for i in range(6)
    ]
    batch = create(client, upload(client, lines), "/v1/images/generations")
    running = wait_for(client, batch.id, {"in_progress"}, 30)
    assert running.status == "in_progress"
    first = request_base(batch.id, 0)
    eventually(lambda: get_redis().get(meta_key(first)), 60, 0.2)  # the first one runs
    assert priority_of(request_base(batch.id, 5)) == "low"
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_for(client, batch.id, {"cancelled"}, 120)
    assert done.status == "cancelled" and done.cancelled_at, done
    counts = done.request_counts
    assert counts.total == 6 and counts.completed + counts.failed == 6 and counts.failed >= 4
    errors = file_lines(client, done.error_file_id)
    assert (
        sum(
            item["error"] and item["error"]["code"] == "batch_cancelled" for item in errors.values()
        )
        >= 4
    )
    assert client.batches.cancel(batch.id).status == "cancelled"  # again: the same batch


def test_a_batch_outlives_the_api_process_that_accepted_it(
    api_factory,  # noqa: F811
    client: openai.OpenAI,
) -> None:
    """The first process submits one request at a time (its pools take one) and is
    killed mid-way; a second one takes the batch over from its cursor."""
    first = api_factory(OMNI_SCHEDULER__MAX_QUEUE_SIZE="1")
    lines = [line(f"t-{i}", "/v1/completions", {**CHAT, "prompt": f"Count {i}"}) for i in range(8)]
    batch = create(first.openai(), upload(first.openai(), lines))
    first.stop(kill=True)
    submitted = int(get_redis().hget(KEYS.api_batch(batch.id), "submitted") or 0)
    assert submitted < len(lines)
    second = api_factory()
    done = wait_for(second.openai(), batch.id, {"completed"}, 300)
    assert done.status == "completed" and done.request_counts.completed == 8, done
    assert set(file_lines(second.openai(), done.output_file_id)) == {f"t-{i}" for i in range(8)}
    assert client.batches.retrieve(batch.id).output_file_id == done.output_file_id
    assert batch.id in [b.id for b in second.openai().batches.list(limit=100)]


def test_a_create_retried_under_its_idempotency_key_is_one_batch(api: ApiServer) -> None:
    client = api.openai()
    file_id = upload(client, [line("k", "/v1/completions", {**CHAT, "prompt": "x"})])
    headers = {"Idempotency-Key": f"batch-{time.time()}"}
    body = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    with api.client() as http:
        one = http.post("/v1/batches", json=body, headers=headers).json()
        two = http.post("/v1/batches", json=body, headers=headers).json()
        assert one["id"] == two["id"]
        other = http.post(
            "/v1/batches", json={**body, "endpoint": "/v1/chat/completions"}, headers=headers
        )
        assert other.status_code == 409
    done = wait_for(client, one["id"], {"completed"}, 120)
    assert done.request_counts.total == 1 and done.request_counts.completed == 1
    assert httpx.get(f"{api.url}/v1/batches").status_code == 401
