"""Parameters of the OpenAI-compatible endpoints through the official `openai` client,
against real `omni-tasks api` processes: every invalid body is the client's own
`BadRequestError`, naming the parameter as the API spells it (never an internal field
name); vLLM-omni's image extras (`true_cfg_scale` with a negative prompt,
`num_outputs_per_prompt`) work on a real diffusion worker; an edit without `size` keeps
the input image's size."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable
from typing import Any

import openai
import pytest
from api_support import ApiServer, api_factory  # noqa: F401
from PIL import Image

#: A key prefix no worker uses: validation answers before any worker is looked for.
LONELY = {"OMNI_KEY_PREFIX": "omni-api-params"}
#: The request's own names for what the image endpoints call otherwise.
INTERNAL = r"\b(steps|guidance|width|height):"

Call = Callable[[openai.OpenAI], Any]


def png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(out, format="PNG")
    return out.getvalue()


def gen(**kwargs: Any) -> Call:
    return lambda client: client.images.generate(prompt="a fox", **kwargs)


def chat(**kwargs: Any) -> Call:
    messages = [{"role": "user", "content": "hi"}]
    return lambda client: client.chat.completions.create(
        model="tiny-llama", messages=messages, **kwargs
    )


#: (what the client sends, the parameter the error must name, words the message holds).
INVALID: list[tuple[str, Call, str, str]] = [
    ("size off the multiple", gen(size="72x64"), "size", "the width must be a multiple of 16"),
    ("size malformed", gen(size="1024x"), "size", "WIDTHxHEIGHT"),
    ("size zero", gen(size="0x1024"), "size", "the width should be greater than"),
    ("too many images", gen(n=9), "n", "less than or equal to 4"),
    ("no steps", gen(extra_body={"num_inference_steps": 0}), "num_inference_steps", "1"),
    ("guidance too high", gen(extra_body={"guidance_scale": 99}), "guidance_scale", "30"),
    ("negative seed", gen(extra_body={"seed": -1}), "seed", "greater than or equal to 0"),
    ("unknown extra", gen(extra_body={"colour": "red"}), "colour", "unknown parameter"),
    (
        "true CFG without a negative prompt",
        gen(extra_body={"true_cfg_scale": 4.0}),
        "true_cfg_scale",
        "negative_prompt",
    ),
    (
        "true CFG below 1",
        gen(extra_body={"true_cfg_scale": 0.5, "negative_prompt": "blur"}),
        "true_cfg_scale",
        "greater than or equal to 1",
    ),
    (
        "two counts that differ",
        gen(n=3, extra_body={"num_outputs_per_prompt": 2}),
        "num_outputs_per_prompt",
        "differs from n",
    ),
    (
        "several streamed images",
        gen(stream=True, extra_body={"num_outputs_per_prompt": 2}),
        "num_outputs_per_prompt",
        "must be 1 when stream is true",
    ),
    ("unknown response format", gen(response_format="gif"), "response_format", "b64_json"),
    ("blank prompt", lambda c: c.images.generate(prompt=" "), "prompt", "blank"),
    (
        "an edit of no image",
        lambda c: c.images.edit(image=("x.png", b"not an image", "image/png"), prompt="x"),
        "image",
        "PNG",
    ),
    ("chat temperature", chat(temperature=9), "temperature", "2"),
    ("chat max_completion_tokens", chat(max_completion_tokens=0), "max_completion_tokens", "1"),
]


@pytest.fixture(scope="module")
def lonely(api_factory) -> ApiServer:  # noqa: F811
    return api_factory(**LONELY)


@pytest.mark.parametrize(
    ("send", "param", "words"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_an_invalid_body_is_the_clients_bad_request_naming_the_parameter(
    lonely: ApiServer, send: Call, param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        send(lonely.openai())
    error = caught.value
    assert error.status_code == 400
    assert error.param == param and error.type == "invalid_request_error"
    assert error.body["message"].startswith(f"{param}: "), error.body
    assert words in error.body["message"], error.body
    assert not re.search(INTERNAL, error.body["message"]), error.body


@pytest.fixture(scope="module")
def diffusion(pools: dict, api_factory) -> openai.OpenAI:  # noqa: F811
    """A real diffusion worker (the shared pools') and an API in front of it."""
    return api_factory().openai()


def image_of(item: Any) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json)))


def test_an_edit_without_size_returns_the_input_size(diffusion: openai.OpenAI) -> None:
    for size, want in (((32, 32), (32, 32)), ((100, 60), (96, 64))):
        out = diffusion.images.edit(
            image=("in.png", png(size), "image/png"),
            prompt="the same, in snow",
            extra_body={"num_inference_steps": 2, "seed": 4},
        )
        assert image_of(out.data[0]).size == want
        assert out.size == "auto"
    given = diffusion.images.edit(
        image=("in.png", png((32, 32)), "image/png"), prompt="bigger", size="48x48"
    )
    assert image_of(given.data[0]).size == (48, 48)  # a given size wins


def test_true_cfg_scale_with_a_negative_prompt_reaches_the_pipeline(
    diffusion: openai.OpenAI,
) -> None:
    def render(scale: float) -> bytes:
        extra = {"negative_prompt": "blurry", "true_cfg_scale": scale}
        extra |= {"seed": 7, "num_inference_steps": 3}
        out = diffusion.images.generate(prompt="a lake", size="32x32", extra_body=extra)
        return image_of(out.data[0]).tobytes()

    images = [render(scale) for scale in (2.0, 6.0, 2.0)]
    assert images[0] != images[1]  # the request's own scale is used, and keyed apart
    assert images[0] == images[2]  # the same scale, the same image


def test_num_outputs_per_prompt_is_n(diffusion: openai.OpenAI) -> None:
    out = diffusion.images.generate(
        prompt="two boats", size="32x32", extra_body={"num_outputs_per_prompt": 2, "seed": 1}
    )
    assert [item.model_extra["seed"] for item in out.data] == [1, 2]
    both = diffusion.images.generate(
        prompt="two boats", size="32x32", n=2, extra_body={"num_outputs_per_prompt": 2}
    )
    assert len(both.data) == 2
