"""Every model family on a real diffusion worker (`OMNI_DIFFUSION__MODEL=<tiny model>
celery -A omni_tasks worker -Q diffusion`): it generates, batches same-shape requests
into one step, resumes a preempted request to the same pixels and serves an exact
repeat from its DiT cache, and runs a LoRA adapter of its own. Flux is covered by the
step-scheduling and LoRA tests; the pixels a request should have come from the same
checkpoint run alone in this process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from celery.result import AsyncResult
from conftest import MODELS_CACHE, clean_redis, start_ready_workers
from helpers import eventually
from PIL import Image

from omni_tasks import (
    RequestValidationError,
    encode_image_file,
    generate_image,
    get_config,
    set_config,
)
from omni_tasks.config import ModelEntry

TIMEOUT = 180
# Each family at a size its VAE takes (Sana: multiples of 32).
FAMILIES = {"tiny-sd3": "sd3", "tiny-qwen-image": "qwen-image", "tiny-sana": "sana"}
SIZE = {"width": 64, "height": 64}
#: The requests a high-class arrival preempts: the most steps a request may ask.
LONG = {"steps": 100, **SIZE}


@contextmanager
def serving(model: str, run_dir: Path) -> Iterator[str]:
    """One worker serving `model`, with room for 4 requests per step and a tiny LoRA
    adapter "ink" of its own; this process's config registers both."""
    original = get_config()
    loras = {"ink": f"{model}-lora-ink"}  # built on first use
    models = {**original.models, model: ModelEntry()}
    set_config(replace(original, models=models, loras=loras))
    clean_redis()
    env = {
        "OMNI_DIFFUSION__MODEL": model,
        "OMNI_DIFFUSION__MAX_BATCH_SIZE": "4",
        "OMNI_LORAS": json.dumps(loras),
        # Progress written early: the preemption test waits until its requests step.
        "OMNI_PROGRESS_FIRST_AFTER_S": "0.05",
        "OMNI_PROGRESS_INTERVAL_S": "0.05",
    }
    try:
        [worker] = start_ready_workers(["diffusion"], run_dir / f"logs-{model}", env=env)
        yield model
        worker.stop()
    finally:
        set_config(original)
        clean_redis()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pool(request: pytest.FixtureRequest, tiny_models, run_dir: Path) -> Iterator[str]:
    with serving(request.param, run_dir) as model:
        yield model


@pytest.fixture(scope="module")
def alone(pool: str) -> Iterator:
    """An engine of the same checkpoint in this process, one request per step."""
    from workers.engines.diffusers_engine import DiffusersEngine

    engine = DiffusersEngine(MODELS_CACHE / pool, max_batch_size=1)
    yield engine
    engine.shutdown()


def send(model: str, prompt: str, **fields: object) -> AsyncResult:
    return generate_image.delay(prompt=prompt, model=model, **{**SIZE, **fields})


def pixels(result: dict) -> np.ndarray:
    with Image.open(result["image_path"]) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int64)


def alone_pixels(
    engine, prompt: str, steps: int, seed: int, size: dict[str, int] = SIZE
) -> np.ndarray:
    from workers.engines.base import ImageParams

    out = engine.generate("alone", prompt, ImageParams(**size, steps=steps, seed=seed), 120)
    return np.asarray(out.image.convert("RGB"), dtype=np.int64)


def test_the_family_generates_and_the_result_names_its_model(pool: str, alone) -> None:
    out = send(pool, "a lighthouse at dusk", steps=4, seed=3).get(TIMEOUT)
    assert out["model"] == pool
    assert (out["width"], out["height"]) == (64, 64)
    assert out["denoise_steps"] == 4 and out["cache"]["latents"] == "miss"
    assert alone.family.name == FAMILIES[pool]


def test_four_same_shape_requests_share_steps_with_their_own_pixels(pool: str, alone) -> None:
    prompt = "a red fox in the snow"  # one text length: one batch key
    results = [send(pool, prompt, steps=12, seed=10 + i) for i in range(4)]
    outs = [r.get(TIMEOUT) for r in results]
    assert max(out["max_batch"] for out in outs) >= 2
    for i, out in enumerate(outs):
        diff = np.abs(pixels(out) - alone_pixels(alone, prompt, 12, 10 + i)).max()
        assert diff <= 2, (i, diff)


def test_a_preempted_request_resumes_to_the_same_pixels(pool: str, alone) -> None:
    # Long enough that all four still hold the batch when the high request arrives, on
    # a fast family too (a tiny Qwen-Image step takes milliseconds).
    lows = [send(pool, f"low {i}", **LONG, seed=i, priority="low") for i in range(4)]
    assert eventually(lambda: all(r.state == "PROGRESS" for r in lows), 60, 0.005)
    high = send(pool, "urgent", steps=4, priority="high").get(TIMEOUT)
    outs = [r.get(TIMEOUT) for r in lows]
    paused = [(i, out) for i, out in enumerate(outs) if out["preemptions"]]
    assert paused and high["preemptions"] == 0
    i, out = paused[0]
    size = {"width": LONG["width"], "height": LONG["height"]}
    reference = alone_pixels(alone, f"low {i}", LONG["steps"], i, size)
    assert np.abs(pixels(out) - reference).max() <= 2


def test_an_exact_repeat_is_a_cache_hit(pool: str) -> None:
    first = send(pool, "a quiet harbour", steps=4, seed=7).get(TIMEOUT)
    again = send(pool, "a quiet harbour", steps=4, seed=7).get(TIMEOUT)
    assert first["cache"]["latents"] == "miss" and again["cache"]["latents"] == "hit"
    assert np.array_equal(pixels(first), pixels(again))


def test_a_lora_adapter_changes_the_image_and_the_base_model_stays(pool: str) -> None:
    fields = {"steps": 4, "seed": 5}
    base = send(pool, "a stone bridge", **fields).get(TIMEOUT)
    styled = send(pool, "a stone bridge", **fields, lora=["ink"]).get(TIMEOUT)
    again = send(pool, "a stone bridge", steps=4, seed=6).get(TIMEOUT)
    assert styled["lora"][0]["name"] == "ink"
    assert np.abs(pixels(base) - pixels(styled)).max() > 2
    assert again["lora"] == [] and again["cache"]["latents"] == "miss"


@pytest.fixture(scope="module")
def edit_pool(tiny_models, run_dir: Path) -> Iterator[str]:
    """A worker serving the tiny Qwen-Image-Edit model (every request sends an image)."""
    with serving("tiny-qwen-image-edit", run_dir) as model:
        yield model


def test_the_edit_family_edits_batches_repeats_and_takes_lora(
    edit_pool: str, run_dir: Path
) -> None:
    source = run_dir / "edit-source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
        source
    )
    image = encode_image_file(str(source))
    results = [send(edit_pool, "make it red", image=image, steps=4, seed=i) for i in range(3)]
    outs = [r.get(TIMEOUT) for r in results]
    assert all(out["model"] == edit_pool and out["request_type"] == "image" for out in outs)
    assert max(out["max_batch"] for out in outs) >= 2
    again = send(edit_pool, "make it red", image=image, steps=4, seed=0).get(TIMEOUT)
    assert again["cache"]["latents"] == "hit"
    assert np.array_equal(pixels(again), pixels(outs[0]))
    styled = send(edit_pool, "make it red", image=image, steps=4, seed=0, lora=["ink"])
    assert np.abs(pixels(styled.get(TIMEOUT)) - pixels(outs[0])).max() > 2
    with pytest.raises(RequestValidationError, match="image"):
        send(edit_pool, "no image to edit", steps=4).get(TIMEOUT)
