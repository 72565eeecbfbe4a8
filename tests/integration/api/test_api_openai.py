"""The OpenAI-compatible endpoints through the official `openai` client, unmodified
(only its `base_url`, key and retries set), against real workers and `omni-tasks api`
processes: images (b64, url, WebP, edit, streamed partial images), chat and text
completions (plain and streamed), the model list, and the client's own exception types
for 400, 401, 429 and 504."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from api_support import ApiServer, api_factory  # noqa: F401
from helpers import eventually
from PIL import Image

from omni_tasks import app

CHAT = [{"role": "user", "content": "Tell me a story."}]
#: A request that runs a few seconds on the tiny Flux model on a CPU.
LONG_IMAGE = {"size": "512x512", "extra_body": {"num_inference_steps": 100}}


@pytest.fixture(scope="module")
def api(pools, api_factory) -> ApiServer:  # noqa: F811
    return api_factory()


@pytest.fixture(scope="module")
def client(api: ApiServer) -> openai.OpenAI:
    return api.openai()


def png_of(data: bytes, size: tuple[int, int], fmt: str = "PNG") -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == fmt
    assert image.size == size
    return image


def test_images_generate_b64_in_the_requested_size(client: openai.OpenAI) -> None:
    out = client.images.generate(
        prompt="a red fox",
        size="80x48",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 11, "num_inference_steps": 3, "priority": "high"},
    )
    assert len(out.data) == 2
    for i, item in enumerate(out.data):
        png_of(base64.b64decode(item.b64_json), (80, 48))
        assert item.model_extra["seed"] == 11 + i  # n images: seeds count up
    assert out.size == "80x48"


def test_images_generate_url_serves_the_image_in_its_format(
    client: openai.OpenAI, api: ApiServer
) -> None:
    out = client.images.generate(
        prompt="a lighthouse", size="64x64", response_format="url", extra_body={"seed": 5}
    )
    url = out.data[0].url
    assert url.startswith(api.url + "/v1/files/") and url.endswith(".png")
    with api.client() as http:
        png_of(http.get(url).content, (64, 64))
        webp = http.get(url[: -len(".png")] + ".webp")
        assert webp.headers["content-type"] == "image/webp"
        png_of(webp.content, (64, 64), "WEBP")
    assert httpx.get(url).status_code == 401  # files need the token too
    jpeg = client.images.generate(prompt="a lighthouse", size="64x64", output_format="jpeg")
    png_of(base64.b64decode(jpeg.data[0].b64_json), (64, 64), "JPEG")


def test_images_edit_takes_an_uploaded_image(client: openai.OpenAI) -> None:
    source = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(source, format="PNG")
    out = client.images.edit(
        image=("fox.png", source.getvalue(), "image/png"),
        prompt="the fox in snow",
        size="96x64",
        extra_body={"strength": 0.5, "num_inference_steps": 4, "seed": 3},
    )
    png_of(base64.b64decode(out.data[0].b64_json), (96, 64))
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("x.png", b"not an image", "image/png"), prompt="x")
    assert caught.value.body["param"] == "image"


def test_a_streamed_generation_sends_partial_images_then_the_image(
    client: openai.OpenAI,
) -> None:
    stream = client.images.generate(
        prompt="a castle at dusk",
        size="64x64",
        stream=True,
        partial_images=3,
        extra_body={"num_inference_steps": 8, "seed": 21},
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]
    images = [png_of(base64.b64decode(e.b64_json), (64, 64)) for e in events]
    pixels = [img.tobytes() for img in images]
    assert len(set(pixels)) == 4  # each preview is a later step: every one differs


def test_chat_completion_plain_and_streamed_say_the_same(client: openai.OpenAI) -> None:
    options = {"model": "tiny-llama", "max_tokens": 12, "temperature": 0, "seed": 1}
    plain = client.chat.completions.create(messages=CHAT, **options)
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")
    message = plain.choices[0].message
    assert message.role == "assistant" and message.content
    assert plain.choices[0].finish_reason in ("length", "stop")
    usage = plain.usage
    assert 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            messages=CHAT, stream=True, stream_options={"include_usage": True}, **options
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content  # greedy: the same tokens
    assert chunks[-1].choices == [] and chunks[-1].usage == usage
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason


def test_text_completion_and_the_model_list(client: openai.OpenAI) -> None:
    out = client.completions.create(model="tiny-llama", prompt="Once upon", max_tokens=6)
    assert out.object == "text_completion" and out.choices[0].text
    assert out.usage.completion_tokens <= 6
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny-llama", "tiny-flux"}
    assert models["tiny-flux"].model_extra["pool"] == "diffusion"
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="x")
    assert caught.value.body["param"] == "model"


def test_the_client_raises_its_own_types_for_401_and_400(api: ApiServer) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        api.openai(api_key="wrong").chat.completions.create(model="tiny-llama", messages=CHAT)
    assert caught.value.status_code == 401
    with pytest.raises(openai.BadRequestError) as caught:
        api.openai().chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=0)
    assert caught.value.body["param"] == "max_tokens"


def test_a_full_queue_is_429_with_retry_after(api_factory, pools) -> None:  # noqa: F811
    strict = api_factory(OMNI_SCHEDULER__MAX_QUEUE_SIZE="1")
    with strict.client() as http:
        held = http.post(
            "/v1/jobs",
            json={"type": "diffusion", "prompt": "hold", "width": 512, "height": 512, "steps": 100},
        )
        assert held.status_code == 202, held.text
        try:
            with pytest.raises(openai.RateLimitError) as caught:
                strict.openai().images.generate(prompt="one more", size="64x64")
            assert caught.value.response.headers["retry-after"] == "2"
            assert caught.value.body["code"] == "queue_full"
        finally:
            http.delete(f"/v1/jobs/{held.json()['id']}")


def test_no_result_in_time_is_504_and_the_request_is_cancelled(
    api_factory,  # noqa: F811
    pools,
) -> None:
    impatient = api_factory(OMNI_API__WAIT_TIMEOUT_S="1")
    with pytest.raises(openai.InternalServerError) as caught:
        impatient.openai().images.generate(prompt="slow", **LONG_IMAGE)
    assert caught.value.status_code == 504
    body = caught.value.body
    assert body["code"] == "timeout" and "Traceback" not in body["message"]
    request_id = body["message"].rsplit(" ", 1)[-1]
    revoked = eventually(lambda: app.AsyncResult(request_id).state == "REVOKED", 30)
    assert revoked, app.AsyncResult(request_id).state


def test_a_request_past_its_own_timeout_is_504(client: openai.OpenAI) -> None:
    extra = {**LONG_IMAGE["extra_body"], "timeout_s": 0.5}
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.generate(prompt="too slow", size="512x512", extra_body=extra)
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "timeout"
