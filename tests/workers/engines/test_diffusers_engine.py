"""DiffusersEngine on the tiny random-weight Flux model: real pipeline, no mocks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omni_tasks.errors import EngineStoppedError, RequestTimeoutError, RequestValidationError
from workers.engines.base import ImageOutput, ImageParams
from workers.engines.diffusers_engine import DiffusersEngine

PROMPT = "a photo of an astronaut riding a horse"


@pytest.fixture(scope="module")
def engine(tiny_flux_dir: Path) -> Iterator[DiffusersEngine]:
    eng = DiffusersEngine(tiny_flux_dir)
    yield eng
    eng.shutdown()


def pixels(out: ImageOutput) -> np.ndarray:
    return np.asarray(out.image)


def test_engine_defaults_on_cpu(engine: DiffusersEngine) -> None:
    assert engine.name == "diffusers"
    assert str(engine.device) == "cpu"
    assert str(engine.dtype) == "torch.float32"
    assert engine.size_multiple == 16


@pytest.mark.parametrize(("width", "height", "steps"), [(64, 64, 4), (32, 64, 3), (64, 16, 2)])
def test_text_to_image_size_and_steps(
    engine: DiffusersEngine, width: int, height: int, steps: int
) -> None:
    out = engine.generate("t2i", PROMPT, ImageParams(width, height, steps), timeout_s=60)
    assert isinstance(out.image, Image.Image)
    assert out.image.size == (width, height)
    assert out.image.mode == "RGB"
    assert out.steps_run == steps
    assert set(out.timings) == {
        "total_s",
        "encode_s",
        "denoise_s",
        "decode_s",
        "paused_s",
        "first_step_at",
    }
    assert out.denoise_steps == steps
    assert all(v >= 0 for v in out.timings.values())
    assert pixels(out).std() > 0  # not a blank image


def test_same_seed_same_pixels_other_seed_differs(engine: DiffusersEngine) -> None:
    a = engine.generate("a", PROMPT, ImageParams(seed=7), timeout_s=60)
    b = engine.generate("b", PROMPT, ImageParams(seed=7), timeout_s=60)
    c = engine.generate("c", PROMPT, ImageParams(seed=8), timeout_s=60)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_prompt_changes_image(engine: DiffusersEngine) -> None:
    a = engine.generate("a", "a red cat", ImageParams(), timeout_s=60)
    b = engine.generate("b", "a blue castle at night", ImageParams(), timeout_s=60)
    assert not np.array_equal(pixels(a), pixels(b))


def test_negative_prompt_uses_true_cfg(engine: DiffusersEngine) -> None:
    plain = engine.generate("p", PROMPT, ImageParams(), timeout_s=60)
    neg = engine.generate("n", PROMPT, ImageParams(negative_prompt="blurry"), timeout_s=60)
    assert neg.steps_run == 4  # steps, not transformer calls (true CFG makes two per step)
    assert not np.array_equal(pixels(plain), pixels(neg))


def test_img2img_resizes_and_is_deterministic(engine: DiffusersEngine) -> None:
    gradient = np.linspace(0, 255, 50 * 40 * 3).reshape(40, 50, 3).astype(np.uint8)
    init = Image.fromarray(gradient).convert("RGBA")  # odd size and mode on purpose
    params = ImageParams(width=64, height=32, steps=4, strength=0.5, seed=3)
    a = engine.generate("i2i-a", PROMPT, params, timeout_s=60, init_image=init)
    b = engine.generate("i2i-b", PROMPT, params, timeout_s=60, init_image=init)
    t2i = engine.generate("t2i", PROMPT, params, timeout_s=60)
    assert a.image.size == (64, 32)
    assert a.steps_run == 2  # strength 0.5 of 4 steps
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(t2i))


def test_concurrent_threads_match_sequential(engine: DiffusersEngine) -> None:
    jobs = [
        ("c0", "a red cat", ImageParams(seed=1)),
        ("c1", "a blue castle", ImageParams(width=32, height=48, steps=5, seed=2)),
        ("c2", "a green tree", ImageParams(steps=6, seed=3, negative_prompt="dark")),
    ]
    sequential = [pixels(engine.generate(rid, p, params, 60)) for rid, p, params in jobs]
    with ThreadPoolExecutor(max_workers=3) as pool:
        for _ in range(2):
            futures = [pool.submit(engine.generate, rid, p, params, 60) for rid, p, params in jobs]
            for want, fut in zip(sequential, futures, strict=True):
                assert np.array_equal(pixels(fut.result(timeout=60)), want)


def test_tiny_timeout_raises(engine: DiffusersEngine) -> None:
    with pytest.raises(RequestTimeoutError):
        engine.generate("late", PROMPT, ImageParams(steps=50), timeout_s=1e-4)
    # The engine still serves requests afterwards.
    assert engine.generate("ok", PROMPT, ImageParams(), timeout_s=60).steps_run == 4


def gradient_image() -> Image.Image:
    return Image.fromarray(np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8))


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_embeds_reuse_is_bit_identical(engine: DiffusersEngine, negative: str | None) -> None:
    params = ImageParams(width=48, height=32, steps=4, seed=11, negative_prompt=negative)
    full = engine.generate("full", PROMPT, params, timeout_s=60)
    assert full.embeds is not None
    keys = {"prompt_embeds", "pooled_prompt_embeds"}
    if negative:
        keys |= {"negative_prompt_embeds", "negative_pooled_prompt_embeds"}
    assert set(full.embeds) == keys
    assert all(t.device == engine.device for t in full.embeds.values())
    encoded = engine.encode_prompt(PROMPT, negative)
    assert set(encoded) == keys
    assert all(torch.equal(encoded[k], full.embeds[k]) for k in keys)

    reused = engine.generate("reuse", PROMPT, params, timeout_s=60, embeds=full.embeds)
    assert np.array_equal(pixels(reused), pixels(full))
    assert reused.steps_run == full.steps_run == 4
    assert reused.embeds is not None and set(reused.embeds) == keys
    # Another seed with the same embeddings: same as that seed encoded from scratch.
    other = ImageParams(width=48, height=32, steps=4, seed=12, negative_prompt=negative)
    a = engine.generate("a", PROMPT, other, timeout_s=60, embeds=full.embeds)
    b = engine.generate("b", PROMPT, other, timeout_s=60)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(full))


def test_embeds_without_negative_encode_it(engine: DiffusersEngine) -> None:
    params = ImageParams(steps=3, seed=4, negative_prompt="dark")
    positive = engine.encode_prompt(PROMPT)
    assert set(positive) == {"prompt_embeds", "pooled_prompt_embeds"}
    a = engine.generate("a", PROMPT, params, timeout_s=60, embeds=positive)
    b = engine.generate("b", PROMPT, params, timeout_s=60)
    assert np.array_equal(pixels(a), pixels(b))
    # Negative embeddings are ignored by a request without a negative prompt.
    plain = ImageParams(steps=3, seed=4)
    c = engine.generate("c", PROMPT, plain, timeout_s=60, embeds=b.embeds)
    d = engine.generate("d", PROMPT, plain, timeout_s=60)
    assert np.array_equal(pixels(c), pixels(d))


@pytest.mark.parametrize("img2img", [False, True])
def test_latents_reuse_decodes_only_and_is_bit_identical(
    engine: DiffusersEngine, img2img: bool
) -> None:
    params = ImageParams(width=64, height=48, steps=4, seed=9, strength=0.5)
    init = gradient_image() if img2img else None
    full = engine.generate("full", PROMPT, params, timeout_s=60, init_image=init)
    assert full.latents is not None
    assert tuple(full.latents.shape) == (1, 16, 48 // 8, 64 // 8)
    assert full.latents.device == engine.device

    calls = [0]
    handle = engine.family.pipe.transformer.register_forward_hook(  # type: ignore[union-attr]
        lambda *_: calls.__setitem__(0, calls[0] + 1)
    )
    try:
        decoded = engine.generate("dec", PROMPT, params, timeout_s=60, latents=full.latents)
    finally:
        handle.remove()
    assert calls[0] == 0  # no denoising
    assert np.array_equal(pixels(decoded), pixels(full))
    assert decoded.steps_run == decoded.denoise_steps == 0
    assert decoded.embeds is None
    assert torch.equal(decoded.latents, full.latents)  # type: ignore[arg-type]
    assert decoded.timings["encode_s"] == decoded.timings["denoise_s"] == 0
    assert decoded.timings["decode_s"] > 0


def test_bad_embeds_or_latents_are_rejected(engine: DiffusersEngine) -> None:
    params = ImageParams(width=64, height=64, steps=2)
    good = engine.encode_prompt(PROMPT)
    with pytest.raises(RequestValidationError) as info:
        engine.generate("x", PROMPT, params, 60, embeds={"prompt_embeds": good["prompt_embeds"]})
    assert info.value.field == "embeds"
    with pytest.raises(RequestValidationError) as info:
        engine.generate("x", PROMPT, params, 60, latents=torch.zeros(1, 16, 4, 8))
    assert info.value.field == "latents"


def test_size_not_multiple_of_16_is_rejected(engine: DiffusersEngine) -> None:
    with pytest.raises(RequestValidationError) as info:
        engine.generate("bad", PROMPT, ImageParams(width=40), timeout_s=60)
    assert info.value.field == "width"


def test_shutdown_stops_inflight_and_later_calls(tiny_flux_dir: Path) -> None:
    eng = DiffusersEngine(tiny_flux_dir)
    assert eng.family.pipe is not None
    started = threading.Event()
    eng.family.pipe.transformer.register_forward_hook(lambda *args: started.set())
    outcome: list[BaseException | ImageOutput] = []

    def run() -> None:
        try:
            outcome.append(eng.generate("long", PROMPT, ImageParams(steps=1000), 600))
        except BaseException as exc:  # recorded for the assertion below
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(60)
    t0 = time.perf_counter()
    eng.shutdown()
    thread.join(60)
    assert not thread.is_alive()
    assert time.perf_counter() - t0 < 5  # stopped at the next step, not after 1000
    assert len(outcome) == 1 and isinstance(outcome[0], EngineStoppedError)
    with pytest.raises(EngineStoppedError):
        eng.generate("after", PROMPT, ImageParams(), timeout_s=60)


def test_bad_dtype_is_a_config_error(tiny_flux_dir: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        DiffusersEngine(tiny_flux_dir, dtype="float8")
