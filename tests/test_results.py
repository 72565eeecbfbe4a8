"""Typed results: each serializes to exactly the JSON object workers returned before the
results were typed (same keys, same order), and reads back from it."""

from __future__ import annotations

import json

from helpers import IMAGE_KEYS, MULTIMODAL_KEYS, PROMPT_KEYS, TEXT_KEYS, USAGE_KEYS

from omni_tasks import ImageResult, MultimodalResult, PromptResult, TextResult, Usage
from omni_tasks.results import ProbeResult


def text_result() -> TextResult:
    return TextResult(
        request_id="t-1",
        request_type="text",
        text="once upon a time",
        usage=Usage.of(5, 4),
        finish_reason="length",
        engine="vllm",
        timings={"generate_s": 0.5, "queued_s": 0.01, "run_s": 0.6},
    )


def image_result() -> ImageResult:
    return ImageResult(
        request_id="i-1",
        request_type="diffusion",
        image_path="/out/i-1.png",
        width=64,
        height=32,
        seed=7,
        steps=4,
        steps_run=2,
        step_cache="taylorseer",
        cache={"embeddings": "hit", "latents": "miss"},
        engine="diffusers",
        timings={"encode_s": 0.1, "denoise_s": 0.4, "decode_s": 0.1, "generate_s": 0.6},
    )


def prompt_result() -> PromptResult:
    return PromptResult(
        request_id="m-1",
        text=" a lighthouse\n at dusk ",
        image_prompt="a lighthouse at dusk",
        usage=Usage.of(20, 6),
        finish_reason="stop",
        engine="transformers",
        timings={"generate_s": 0.3, "queued_s": 0.02, "run_s": 0.35},
    )


def multimodal_result() -> MultimodalResult:
    """Built the way the DiT stage builds it: the picture's fields, then the AR stage's."""
    image, prompt = image_result(), prompt_result()
    image.request_id, image.request_type = "m-1", "multimodal"
    return MultimodalResult(
        **vars(image),
        text=prompt.text,
        image_prompt=prompt.image_prompt,
        usage=prompt.usage,
        finish_reason=prompt.finish_reason,
        stages={"ar": prompt.timings, "dit": {"queued_s": 0.05, "run_s": 0.7}},
    )


def test_usage_of_sums_the_tokens() -> None:
    assert Usage.of(12, 30) == Usage(prompt_tokens=12, completion_tokens=30, total_tokens=42)
    assert Usage.of(0, 0) == Usage()
    assert list(vars(Usage.of(1, 2))) == USAGE_KEYS


def test_text_result_json_keys_and_order() -> None:
    data = text_result().to_json()
    assert list(data) == TEXT_KEYS
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert list(data["usage"]) == USAGE_KEYS
    assert data["timings"] == {"generate_s": 0.5, "queued_s": 0.01, "run_s": 0.6}


def test_image_result_json_keys_and_order() -> None:
    data = image_result().to_json()
    assert list(data) == IMAGE_KEYS
    assert (data["width"], data["height"], data["seed"], data["steps_run"]) == (64, 32, 7, 2)
    assert data["cache"] == {"embeddings": "hit", "latents": "miss"}


def test_multimodal_result_json_is_the_image_keys_then_the_text_keys() -> None:
    data = multimodal_result().to_json()
    assert list(data) == MULTIMODAL_KEYS
    assert data["usage"] == {"prompt_tokens": 20, "completion_tokens": 6, "total_tokens": 26}
    assert data["image_prompt"] == "a lighthouse at dusk"
    assert list(data["stages"]) == ["ar", "dit"]
    assert data["stages"]["ar"]["run_s"] == 0.35


def test_multimodal_result_defaults_for_the_text_fields() -> None:
    image = image_result()
    data = MultimodalResult(**vars(image)).to_json()
    assert list(data) == MULTIMODAL_KEYS
    assert (data["text"], data["image_prompt"], data["finish_reason"]) == ("", None, None)
    assert data["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert data["stages"] == {}


def test_prompt_result_json_keys_and_order() -> None:
    data = prompt_result().to_json()
    assert list(data) == PROMPT_KEYS
    assert list(data["usage"]) == USAGE_KEYS


def test_probe_result_json() -> None:
    assert ProbeResult(request_id="p-1").to_json() == {
        "request_id": "p-1",
        "text": "",
        "timings": {},
    }


def test_from_json_round_trips_through_the_wire() -> None:
    for result in (
        text_result(),
        image_result(),
        multimodal_result(),
        prompt_result(),
        ProbeResult("p-1"),
    ):
        data = result.to_json()
        again = type(result).from_json(data)
        assert again == result
        assert again.to_json() == data
        # Celery stores JSON only: the same holds after a trip through json.
        wire = json.loads(json.dumps(data))
        assert type(result).from_json(wire) == result
        if hasattr(result, "usage"):
            assert isinstance(type(result).from_json(wire).usage, Usage)


def test_from_json_ignores_keys_the_result_does_not_have() -> None:
    data = {**prompt_result().to_json(), "state": "SUCCESS", "worker": "ar-1@host"}
    assert PromptResult.from_json(data) == prompt_result()
    # A multimodal result read as its AR stage's result keeps the AR fields it has.
    stage = TextResult.from_json({**multimodal_result().to_json(), "request_type": "text"})
    assert stage.usage == Usage.of(20, 6) and stage.engine == "diffusers"


def test_to_json_is_a_copy() -> None:
    result = image_result()
    data = result.to_json()
    data["cache"]["latents"] = "hit"
    data["timings"].clear()
    assert result.cache["latents"] == "miss" and result.timings
