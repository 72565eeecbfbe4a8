"""Every model family on a real diffusion worker (`OMNI_DIFFUSION__MODEL=<tiny model>
celery -A omni_tasks worker -Q diffusion`): it generates, batches same-shape requests
into one step, resumes a preempted request to the same pixels and serves an exact
repeat from its DiT cache. Flux is covered by the step-scheduling tests; the pixels a
request should have come from the same checkpoint run alone in this process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from celery.result import AsyncResult
from conftest import MODELS_CACHE, clean_redis, start_ready_workers
from helpers import eventually
from PIL import Image

from omni_tasks import generate_image, get_config, set_config
from omni_tasks.config import ModelEntry

TIMEOUT = 180
# Each family at a size its VAE takes (Sana: multiples of 32).
FAMILIES = {"tiny-sd3": "sd3", "tiny-qwen-image": "qwen-image", "tiny-sana": "sana"}
SIZE = {"width": 64, "height": 64}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pool(request: pytest.FixtureRequest, tiny_models, run_dir: Path) -> Iterator[str]:
    """One worker serving the family's tiny model, with room for 4 requests per step."""
    model = request.param
    original = get_config()
    set_config(replace(original, models={**original.models, model: ModelEntry()}))
    clean_redis()
    env = {"OMNI_DIFFUSION__MODEL": model, "OMNI_DIFFUSION__MAX_BATCH_SIZE": "4"}
    try:
        [worker] = start_ready_workers(["diffusion"], run_dir / f"logs-{model}", env=env)
        yield model
        worker.stop()
    finally:
        set_config(original)
        clean_redis()


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


def alone_pixels(engine, prompt: str, steps: int, seed: int) -> np.ndarray:
    from workers.engines.base import ImageParams

    out = engine.generate("alone", prompt, ImageParams(**SIZE, steps=steps, seed=seed), 120)
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
    lows = [send(pool, f"low {i}", steps=60, seed=i, priority="low") for i in range(4)]
    assert eventually(lambda: lows[-1].state in ("STARTED", "PROGRESS"), 60, 0.01)
    time.sleep(0.3)
    high = send(pool, "urgent", steps=4, priority="high").get(TIMEOUT)
    outs = [r.get(TIMEOUT) for r in lows]
    paused = [(i, out) for i, out in enumerate(outs) if out["preemptions"]]
    assert paused and high["preemptions"] == 0
    i, out = paused[0]
    assert np.abs(pixels(out) - alone_pixels(alone, f"low {i}", 60, i)).max() <= 2


def test_an_exact_repeat_is_a_cache_hit(pool: str) -> None:
    first = send(pool, "a quiet harbour", steps=4, seed=7).get(TIMEOUT)
    again = send(pool, "a quiet harbour", steps=4, seed=7).get(TIMEOUT)
    assert first["cache"]["latents"] == "miss" and again["cache"]["latents"] == "hit"
    assert np.array_equal(pixels(first), pixels(again))
