"""Step-level DiT acceleration on the tiny random-weight Flux: real pipeline, no mocks.

Every mode against no cache at 128x128, 8 steps, same seed. Measured mean relative pixel
difference vs mode none (this machine): taylorseer 0.53%, magcache 0.27%, first_block 1.0%,
pab 0.04%, cache_dit 0.77%; the bounds below leave about 2x headroom.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omni_tasks.errors import ConfigError, ProcessingError, RequestTimeoutError
from workers.engines import step_cache
from workers.engines.base import ImageOutput, ImageParams, StepCacheSettings
from workers.engines.diffusers_engine import DiffusersEngine

PROMPT = "a photo of an astronaut riding a horse"
STEPS = 8
# mode -> upper bound of the mean relative difference vs no cache (measured ~half of it).
BOUNDS = {
    "taylorseer": 0.012,
    "magcache": 0.008,
    "first_block": 0.02,
    "pab": 0.002,
    "cache_dit": 0.016,
}
needs_cache_dit = pytest.mark.skipif(
    not step_cache.cache_dit_available(), reason="cache-dit is not installed"
)
MODES = [
    pytest.param(m, marks=needs_cache_dit) if m == "cache_dit" else m
    for m in step_cache.STEP_CACHE_MODES
    if m != "none"
]


@pytest.fixture(scope="module")
def engine(tiny_flux_dir: Path) -> Iterator[DiffusersEngine]:
    eng = DiffusersEngine(tiny_flux_dir)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(engine: DiffusersEngine) -> np.ndarray:
    return pixels(engine.generate("ref", PROMPT, params("none"), 60))


def params(mode: str, size: int = 128, steps: int = STEPS, **kwargs: object) -> ImageParams:
    """128x128 (or `size`), 8 steps, seed 0 unless given, with step cache `mode`."""
    kwargs.setdefault("seed", 0)
    return ImageParams(size, size, steps, step_cache=StepCacheSettings(mode), **kwargs)  # type: ignore[arg-type]


def pixels(out: ImageOutput) -> np.ndarray:
    return np.asarray(out.image)


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a - b).mean() / np.abs(b).mean())


def count_calls(module: object) -> tuple[list[int], object]:
    calls = [0]
    handle = module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))  # type: ignore[attr-defined]
    return calls, handle


@pytest.mark.parametrize("mode", MODES)
def test_mode_skips_work_within_bound(
    engine: DiffusersEngine, reference: np.ndarray, mode: str
) -> None:
    transformer = engine.family.pipe.transformer  # type: ignore[union-attr]
    attn_calls, handle = count_calls(transformer.transformer_blocks[0].attn.to_q)
    try:
        out = engine.generate(mode, PROMPT, params(mode), 60)
    finally:
        handle.remove()  # type: ignore[attr-defined]
    assert out.denoise_steps == STEPS
    if mode not in step_cache.STEP_SKIPPING_MODES:  # pab
        # PAB reuses attention outputs only: every block runs, attention in fewer of them.
        assert out.steps_run == STEPS
        assert attn_calls[0] < STEPS
    else:
        assert 1 <= out.steps_run < STEPS
    if mode == "taylorseer":  # steps 0, 1 (warmup), then every 2nd: 3, 5, 7
        assert out.steps_run == 5
    diff = rel_diff(pixels(out), reference)
    assert 0 < diff < BOUNDS[mode], f"{mode}: {diff:.4%}"
    assert not transformer.is_cache_enabled  # hooks gone after the request


def test_mode_none_counts_every_step(engine: DiffusersEngine, reference: np.ndarray) -> None:
    out = engine.generate("none", PROMPT, params("none"), 60)
    assert out.steps_run == out.denoise_steps == STEPS
    assert np.array_equal(pixels(out), reference)


@pytest.mark.parametrize("mode", MODES)
def test_no_state_leaks_between_requests(engine: DiffusersEngine, mode: str) -> None:
    a = engine.generate("a", PROMPT, params(mode), 60)
    other = engine.generate("b", "a blue castle at night", params(mode, seed=5), 60)
    c = engine.generate("c", PROMPT, params(mode), 60)
    assert np.array_equal(pixels(a), pixels(c))
    assert a.steps_run == c.steps_run
    assert not np.array_equal(pixels(a), pixels(other))


def test_mode_none_after_cached_matches_fresh_engine(
    engine: DiffusersEngine, tiny_flux_dir: Path
) -> None:
    for mode in step_cache.STEP_CACHE_MODES:
        if mode == "cache_dit" and not step_cache.cache_dit_available():
            continue
        engine.generate(mode, PROMPT, params(mode, negative_prompt="blurry"), 60)
        engine.generate(mode, PROMPT, params(mode), 60)
    after = engine.generate("after", PROMPT, params("none"), 60)
    fresh_engine = DiffusersEngine(tiny_flux_dir)
    try:
        fresh = fresh_engine.generate("fresh", PROMPT, params("none"), 60)
    finally:
        fresh_engine.shutdown()
    assert np.array_equal(pixels(after), pixels(fresh))
    assert after.steps_run == STEPS


@pytest.mark.parametrize("mode", MODES)
def test_state_cleared_after_exception_and_timeout(
    engine: DiffusersEngine, reference: np.ndarray, mode: str
) -> None:
    transformer = engine.family.pipe.transformer  # type: ignore[union-attr]
    want = pixels(engine.generate("want", PROMPT, params(mode), 60))
    calls = [0]

    def fail_on_fourth(*_: object) -> None:
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("boom")

    handle = transformer.register_forward_pre_hook(fail_on_fourth)
    try:
        with pytest.raises(ProcessingError, match="boom"):
            engine.generate("boom", PROMPT, params(mode), 60)
    finally:
        handle.remove()
    assert not transformer.is_cache_enabled

    slow = transformer.register_forward_pre_hook(lambda *_: time.sleep(0.1))
    try:
        with pytest.raises(RequestTimeoutError):
            engine.generate("late", PROMPT, params(mode), timeout_s=0.35)
    finally:
        slow.remove()
    assert not transformer.is_cache_enabled

    assert np.array_equal(pixels(engine.generate("again", PROMPT, params(mode), 60)), want)
    assert np.array_equal(pixels(engine.generate("none", PROMPT, params("none"), 60)), reference)


@pytest.mark.parametrize("mode", MODES)
def test_true_cfg_and_img2img_with_cache(engine: DiffusersEngine, mode: str) -> None:
    neg = params(mode, negative_prompt="blurry")
    a = engine.generate("neg-a", PROMPT, neg, 60)
    b = engine.generate("neg-b", PROMPT, neg, 60)
    assert np.array_equal(pixels(a), pixels(b))
    assert a.denoise_steps == STEPS and a.steps_run <= STEPS

    gradient = np.linspace(0, 255, 128 * 128 * 3).reshape(128, 128, 3).astype(np.uint8)
    init = Image.fromarray(gradient)
    i2i = params(mode, strength=0.75)
    c = engine.generate("i2i-a", PROMPT, i2i, 60, init_image=init)
    d = engine.generate("i2i-b", PROMPT, i2i, 60, init_image=init)
    assert np.array_equal(pixels(c), pixels(d))
    assert c.denoise_steps == 6 and c.steps_run <= 6


def test_concurrent_threads_with_different_modes(engine: DiffusersEngine) -> None:
    modes = [m for m in step_cache.STEP_CACHE_MODES if m != "cache_dit"]
    if step_cache.cache_dit_available():
        modes.append("cache_dit")
    jobs = [
        (f"j{i}", f"{PROMPT} {i}", params(mode, size=64 if i % 2 else 128, seed=i))
        for i, mode in enumerate(modes + modes[::-1])
    ]
    sequential = [pixels(engine.generate(rid, p, prm, 60)) for rid, p, prm in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(2):
            futures = [pool.submit(engine.generate, rid, p, prm, 60) for rid, p, prm in jobs]
            for want, fut in zip(sequential, futures, strict=True):
                assert np.array_equal(pixels(fut.result(timeout=120)), want)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        (StepCacheSettings("turbo"), "step_cache"),
        (StepCacheSettings("none", {"threshold": 1.0}), "step_cache_params.threshold"),
        (
            StepCacheSettings("taylorseer", {"cache_interval": 0}),
            "step_cache_params.cache_interval",
        ),
        (
            StepCacheSettings("taylorseer", {"cache_interval": 2.5}),
            "step_cache_params.cache_interval",
        ),
        (StepCacheSettings("magcache", {"bogus": 1.0}), "step_cache_params.bogus"),
        (StepCacheSettings("first_block", {"threshold": -1.0}), "step_cache_params.threshold"),
        (StepCacheSettings("first_block", {"threshold": "high"}), "step_cache_params.threshold"),  # type: ignore[dict-item]
        (
            StepCacheSettings("first_block", {"threshold": float("nan")}),
            "step_cache_params.threshold",
        ),
        (
            StepCacheSettings("pab", {"timestep_skip_start": 900.0}),
            "step_cache_params.timestep_skip_start",
        ),
        (
            StepCacheSettings("cache_dit", {"Fn_compute_blocks": 0}),
            "step_cache_params.Fn_compute_blocks",
        ),
    ],
)
def test_bad_settings_raise_config_error(
    engine: DiffusersEngine, settings: StepCacheSettings, field: str
) -> None:
    if settings.mode == "cache_dit" and not step_cache.cache_dit_available():
        field = "step_cache"
    bad = ImageParams(64, 64, 2, step_cache=settings)
    with pytest.raises(ConfigError) as info:
        engine.generate("bad", PROMPT, bad, 60)
    assert info.value.field == field
    with pytest.raises(ConfigError):
        step_cache.resolve(settings)


def test_cache_dit_missing_is_a_clear_config_error(
    engine: DiffusersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step_cache, "cache_dit_available", lambda: False)
    with pytest.raises(ConfigError, match="cache-dit") as info:
        engine.generate("x", PROMPT, params("cache_dit"), 60)
    assert info.value.field == "step_cache"


def test_resolve_defaults_and_cache_key() -> None:
    assert step_cache.resolve(StepCacheSettings()) == {}
    assert step_cache.cache_key(StepCacheSettings()) == "none"
    resolved = step_cache.resolve(StepCacheSettings("taylorseer", {"cache_interval": 3.0}))
    assert resolved["cache_interval"] == 3 and isinstance(resolved["cache_interval"], int)
    assert resolved["disable_cache_before_step"] == 2
    # Defaults spelled out or left implicit give one key; other values another.
    implicit = step_cache.cache_key(StepCacheSettings("first_block"))
    explicit = step_cache.cache_key(StepCacheSettings("first_block", {"threshold": 1}))
    assert implicit == explicit == "first_block(threshold=1.0)"
    assert step_cache.cache_key(StepCacheSettings("first_block", {"threshold": 0.5})) != implicit
    for mode in step_cache.STEP_CACHE_MODES:
        assert set(step_cache.defaults(mode)) == set(step_cache.PARAMS[mode])


def test_magcache_ratios_for_img2img_and_other_lengths() -> None:
    full = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    assert step_cache.magcache_ratios_for(full, 6, 6) == full
    assert step_cache.magcache_ratios_for(full, 6, 3) == [1.0, 1.4, 1.5]
    stretched = step_cache.magcache_ratios_for(full, 11, 11)  # nearest, as diffusers does
    assert len(stretched) == 11 and stretched[0] == 1.0 and stretched[-1] == 1.5


def test_magcache_calibrates_once_per_setting(engine: DiffusersEngine, tiny_flux_dir: Path) -> None:
    cal = params("magcache", size=64, steps=6, seed=1)
    first = engine.generate("m1", PROMPT, cal, 60)
    second = engine.generate("m2", PROMPT, cal, 60)
    assert "calibrate_s" in first.timings and "calibrate_s" not in second.timings
    assert np.array_equal(pixels(first), pixels(second))
    ratios = engine.mag_ratios[(6, 64, 64)]
    assert len(ratios) == 6 and ratios[0] == 1.0
    assert engine.calibrate_magcache(6, 64, 64) == ratios  # kept, not recalibrated

    # Ratios handed to another engine: no calibration there, same pixels.
    other = DiffusersEngine(tiny_flux_dir, mag_ratios=engine.mag_ratios)
    try:
        third = other.generate("m3", PROMPT, cal, 60)
        assert "calibrate_s" not in third.timings
        assert np.array_equal(pixels(third), pixels(first))
    finally:
        other.shutdown()


def test_waiting_for_the_transformer_honours_timeout(engine: DiffusersEngine) -> None:
    transformer = engine.family.pipe.transformer  # type: ignore[union-attr]
    started = threading.Event()

    def slow_step(*_: object) -> None:
        started.set()
        time.sleep(0.05)

    slow = transformer.register_forward_pre_hook(slow_step)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            long = pool.submit(engine.generate, "long", PROMPT, params("taylorseer"), 60)
            assert started.wait(30)
            t0 = time.perf_counter()
            with pytest.raises(RequestTimeoutError):
                engine.generate("queued", PROMPT, params("none"), timeout_s=0.2)
            assert time.perf_counter() - t0 < 0.3 + 0.2  # gave up while the lock was held
            assert long.result(60).steps_run == 5
    finally:
        slow.remove()
