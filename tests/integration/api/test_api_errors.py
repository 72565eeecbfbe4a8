"""Errors of the HTTP API that need no worker, from a real `omni-tasks api` process:
the bearer token (401), the body limit (413), malformed bodies and bad fields (400,
naming them), no live worker (503); all in OpenAI's shape, none with a traceback, and
nothing enqueued for any of them."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from api_support import ApiServer, api_factory  # noqa: F401

from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.keys import queue_keys

#: A key prefix no worker uses: this API sees no live worker, whatever else runs.
LONELY = {"OMNI_KEY_PREFIX": "omni-api-lonely", "OMNI_API__MAX_BODY_MB": "0.01"}
IMAGES = "/v1/images/generations"
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def lonely(api_factory) -> ApiServer:  # noqa: F811
    return api_factory(**LONELY)


@pytest.fixture()
def client(lonely: ApiServer) -> Iterator:
    with lonely.client() as found:
        yield found


def assert_openai_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def nothing_queued() -> bool:
    client = get_redis()
    queues = ("ar", "diffusion", "diffusion.tiny-flux")
    return all(client.llen(k) == 0 for q in queues for k in queue_keys(q))


def test_without_the_bearer_token_every_endpoint_answers_401(lonely: ApiServer) -> None:
    with lonely.client() as good:
        good.headers.pop("Authorization")
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/jobs/x"),
            ("GET", "/v1/files/x.png"),
        ):
            response = good.request(method, path, json=CHAT)
            error = assert_openai_error(response, 401)
            assert error["type"] == "authentication_error"
            assert response.headers["www-authenticate"] == "Bearer"
        wrong = good.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert_openai_error(wrong, 401)
        assert good.get("/healthz").json() == {"status": "ok"}  # for load balancers
    with pytest.raises(openai.AuthenticationError):
        lonely.openai(api_key="nope").models.list()


def test_a_body_over_the_limit_is_413_declared_or_streamed(client) -> None:
    big = {"prompt": "x" * 20_000, "model": "tiny-flux"}
    error = assert_openai_error(client.post("/v1/images/generations", json=big), 413)
    assert "api.max_body_mb" in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"type": "text", "prompt": "'
        for _ in range(20):
            yield b"x" * 1000
        yield b'"}'

    streamed = client.post(
        "/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_openai_error(streamed, 413)
    assert nothing_queued()


def test_malformed_bodies_are_400(client) -> None:
    headers = {"Content-Type": "application/json"}
    for path in ("/v1/jobs", "/v1/chat/completions", "/v1/images/generations"):
        error = assert_openai_error(client.post(path, content=b"{nope", headers=headers), 400)
        assert error["code"] == "bad_json"
    assert_openai_error(client.post("/v1/jobs", json=[1, 2]), 400)


def test_bad_fields_are_400_naming_them_before_anything_is_enqueued(client, lonely) -> None:
    cases = [
        (IMAGES, {"prompt": "x", "size": "72x64"}, "size"),
        (IMAGES, {"prompt": "x", "n": 9}, "n"),
        (
            "/v1/images/generations",
            {"prompt": "x", "num_inference_steps": 0},
            "num_inference_steps",
        ),
        (IMAGES, {"prompt": "x", "seed": -1}, "seed"),
        (IMAGES, {"prompt": "x", "colour": "red"}, "colour"),
        (IMAGES, {"prompt": "x", "stream": True, "n": 2}, "n"),
        ("/v1/chat/completions", {**CHAT, "temperature": 9}, "temperature"),
        ("/v1/chat/completions", {"model": "m", "messages": []}, "messages"),
        ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/jobs", {"type": "movie", "prompt": "x"}, "type"),
        ("/v1/jobs", {"type": "video", "prompt": "x", "num_frames": 8}, "num_frames"),
        ("/v1/jobs", {"type": "diffusion", "prompt": "x", "width": 70}, "width"),
        ("/v1/jobs", {"type": "text", "prompt": ""}, "prompt"),
        ("/v1/jobs", {"type": "text", "prompt": "x", "request_id": "mine"}, "request_id"),
        ("/v1/jobs", {"type": "text", "prompt": "x", "webhook_url": "ftp://x"}, "webhook_url"),
        # An unregistered diffusion model: 400 before the pool's 503.
        (IMAGES, {"prompt": "x", "model": "dall-e-3"}, "model"),
        ("/v1/jobs", {"type": "multimodal", "prompt": "x", "model": "nope"}, "model"),
    ]
    for path, body, param in cases:
        error = assert_openai_error(client.post(path, json=body), 400, param)
        assert error["type"] == "invalid_request_error"
        assert error["message"].startswith(f"{param}: "), error
    bad_priority = client.post(
        "/v1/jobs", json={"type": "text", "prompt": "x"}, headers={"X-Priority": "urgent"}
    )
    assert_openai_error(bad_priority, 400, "X-Priority")
    with pytest.raises(openai.BadRequestError) as caught:
        lonely.openai().images.generate(prompt="x", size="72x64")
    assert caught.value.body["param"] == "size"
    assert nothing_queued()


def test_no_live_worker_for_the_pool_is_503(client) -> None:
    for path, body in (
        ("/v1/chat/completions", CHAT),
        (IMAGES, {"prompt": "x"}),
        ("/v1/jobs", {"type": "multimodal", "prompt": "x"}),
    ):
        response = client.post(path, json=body)
        error = assert_openai_error(response, 503)
        assert error["code"] == "no_live_worker"
        assert "pool" in error["message"]
        assert response.headers["retry-after"]
    assert client.get("/v1/models").json() == {"object": "list", "data": []}
    assert_openai_error(client.get("/v1/jobs/none"), 404, "id")
    assert nothing_queued()
