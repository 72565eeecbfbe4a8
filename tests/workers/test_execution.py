"""Running one validated request on this process's engines (`workers.execution`): each
stage returns its typed result (`omni_tasks.results`), whose JSON has the documented
keys. In-process, on the process-wide runtime with the tiny real models (the lighter
transformers engine for text) and the real Redis of the tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import IMAGE_KEYS, MULTIMODAL_KEYS, PROMPT_KEYS, TEXT_KEYS, USAGE_KEYS, assert_png

from omni_tasks import (
    ProcessingError,
    RequestValidationError,
    create_diffusion_request,
    create_image_request,
    create_multimodal_request,
    create_text_request,
)
from omni_tasks.config import get_config, set_config
from omni_tasks.requests import encode_image_file
from omni_tasks.results import ImageResult, MultimodalResult, PromptResult, TextResult
from workers.execution import (
    run_image,
    run_multimodal_prompt,
    run_multimodal_render,
    run_text,
    timeout_for,
)

IMAGE_PHASES = {"encode_s", "denoise_s", "decode_s", "total_s", "generate_s"}


@contextmanager
def config_with(**changes: Any) -> Iterator[Any]:
    original = get_config()
    changed = replace(original, **changes)
    set_config(changed)
    try:
        yield changed
    finally:
        set_config(original)


@pytest.fixture(scope="module")
def output_dir(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The config of these tests: the tiny models, transformers for text, outputs in a
    temporary folder; the process-wide config is restored afterwards."""
    folder = tmp_path_factory.mktemp("execution-outputs")
    config = get_config()
    with config_with(
        models_dir=str(tiny_models["tiny-llama"].parent),
        output_dir=str(folder),
        ar=replace(config.ar, engine="transformers"),
    ):
        yield folder


def unique(prompt: str) -> str:
    """A prompt no earlier test cached (the process-wide runtime keeps its DiT cache)."""
    return f"{prompt} {uuid.uuid4().hex[:8]}"


def test_run_text_returns_a_text_result(output_dir: Path) -> None:
    request = create_text_request("hello there", max_tokens=4, temperature=0)
    result = run_text(request)
    assert isinstance(result, TextResult)
    value = result.to_json()
    assert list(value) == TEXT_KEYS
    assert value["request_id"] == request.request_id and value["request_type"] == "text"
    assert isinstance(value["text"], str)
    assert list(value["usage"]) == USAGE_KEYS
    usage = value["usage"]
    assert usage["completion_tokens"] == 4 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert value["finish_reason"] == "length"
    assert value["engine"] == "transformers"
    assert set(value["timings"]) == {"generate_s"} and value["timings"]["generate_s"] > 0


def test_run_image_returns_an_image_result(output_dir: Path, redis_client) -> None:
    request = create_diffusion_request(unique("a red fox"), width=48, height=32, steps=2, seed=7)
    result = run_image(request)
    assert isinstance(result, ImageResult)
    value = result.to_json()
    assert list(value) == IMAGE_KEYS
    assert value["request_id"] == request.request_id and value["request_type"] == "diffusion"
    assert (value["width"], value["height"], value["seed"]) == (48, 32, 7)
    assert value["steps"] == 2 and value["steps_run"] == 2
    assert value["step_cache"] == "none"
    assert value["cache"] == {"latents": "miss", "embeddings": "miss"}
    assert value["engine"] == "diffusers"
    assert IMAGE_PHASES <= set(value["timings"])
    path = Path(value["image_path"])
    assert path.name == f"{request.request_id}.png" and path.parent.parent == output_dir
    assert_png(path, 48, 32)


def test_run_image_of_an_image_request_starts_from_its_picture(
    output_dir: Path, redis_client
) -> None:
    base = run_image(create_diffusion_request(unique("a fox"), width=32, height=32, steps=2))
    request = create_image_request(
        unique("the fox in snow"),
        image=encode_image_file(base.image_path),
        width=32,
        height=32,
        steps=4,
    )
    value = run_image(request).to_json()
    assert list(value) == IMAGE_KEYS
    assert value["request_type"] == "image"
    assert value["steps"] == 4 and 0 < value["steps_run"] < 4  # img2img: strength < 1
    assert_png(value["image_path"], 32, 32)


def test_requests_whose_ids_differ_never_share_an_image(output_dir: Path, redis_client) -> None:
    tag = uuid.uuid4().hex[:8]
    a = run_image(
        create_diffusion_request(
            unique("a fox"), request_id=f"{tag}/collide", width=32, height=32, steps=1, seed=1
        )
    )
    first_png = Path(a.image_path).read_bytes()
    b = run_image(
        create_diffusion_request(
            unique("a cat"), request_id=f"{tag}_collide", width=48, height=32, steps=1, seed=2
        )
    )
    assert a.image_path != b.image_path
    assert Path(a.image_path).read_bytes() == first_png  # the second did not replace it
    assert_png(a.image_path, 32, 32)
    assert_png(b.image_path, 48, 32)


def test_an_input_image_that_does_not_decode_is_refused_naming_the_field(
    output_dir: Path, tmp_path: Path
) -> None:
    """Its header passes the producer's check; the worker decodes it and refuses it,
    before any model runs."""
    from PIL import Image

    picture = tmp_path / "in.png"
    Image.new("RGB", (32, 32), "green").save(picture)
    truncated = picture.read_bytes()[:60]
    request = create_image_request(unique("broken"), image=truncated, width=32, height=32)
    with pytest.raises(RequestValidationError) as info:
        run_image(request)
    assert info.value.field == "image" and "cannot be decoded" in str(info.value)


def test_multimodal_stages_return_their_results(output_dir: Path, redis_client) -> None:
    request = create_multimodal_request(
        unique("a lighthouse"), max_tokens=6, width=32, height=32, steps=2, seed=5
    )
    prompt = run_multimodal_prompt(request)
    assert isinstance(prompt, PromptResult)
    written = prompt.to_json()
    assert list(written) == PROMPT_KEYS
    assert written["image_prompt"] and written["usage"]["completion_tokens"] == 6
    # What the handler adds to the AR stage's timings before the chain passes them on.
    written["timings"].update(queued_s=0.5, run_s=1.0)

    result = run_multimodal_render(request, written)
    assert isinstance(result, MultimodalResult)
    value = result.to_json()
    assert list(value) == MULTIMODAL_KEYS
    assert value["request_type"] == "multimodal" and value["seed"] == 5
    assert (value["text"], value["image_prompt"]) == (written["text"], written["image_prompt"])
    assert value["usage"] == written["usage"]
    assert value["stages"]["ar"] == written["timings"]
    assert set(value["stages"]["dit"]) == {"queued_s", "run_s"}
    assert value["timings"]["queued_s"] >= 0.5 and value["timings"]["run_s"] > 1.0
    assert_png(value["image_path"], 32, 32)


@pytest.mark.parametrize("prompt_result", [None, {}])
def test_render_without_a_prompt_result_fails(prompt_result: dict | None) -> None:
    request = create_multimodal_request("orphan render", width=32, height=32, steps=1)
    with pytest.raises(ProcessingError, match="no AR stage result"):
        run_multimodal_render(request, prompt_result)


def test_timeout_for_caps_the_requests_own_timeout_by_the_config() -> None:
    config = get_config()
    near = pytest.approx  # what is left of a deadline shrinks while the test runs
    with config_with(scheduler=replace(config.scheduler, timeout_seconds=100), request_timeout=50):
        assert timeout_for(create_text_request("x")) == 50  # none given: the cap
        assert timeout_for(create_text_request("x", timeout_s=10)) == near(10, abs=0.5)
        assert timeout_for(create_text_request("x", timeout_s=500)) == near(50, abs=0.5)
    with config_with(scheduler=replace(config.scheduler, timeout_seconds=20)):
        # the lower cap
        assert timeout_for(create_text_request("x", timeout_s=30)) == near(20, abs=0.5)


def test_timeout_for_counts_from_the_requests_creation() -> None:
    import time

    created = time.time() - 3
    waited = create_text_request("x", timeout_s=10, created_at=created)
    assert timeout_for(waited) == pytest.approx(7, abs=0.5)  # 3 s were spent queued
    late = create_text_request("x", timeout_s=2, created_at=created)
    assert timeout_for(late) == 0.0  # past its deadline: the engine stops it at once
