"""The step loop on the real tiny Flux: batches of concurrent requests, preemption that
changes no pixel, deadlines and cancellation at step boundaries, progress per step."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from omni_tasks.config import CoreModuleConfig, SchedulerConfig, SchedulerType
from omni_tasks.errors import RequestCancelledError, RequestTimeoutError
from workers.engines.base import ImageOutput, ImageParams
from workers.stepping import StepTicket

SIZE = {"width": 128, "height": 128}


@pytest.fixture(scope="module")
def engine(tiny_flux_dir: Path) -> Iterator:
    from workers.engines.diffusers_engine import DiffusersEngine

    config = CoreModuleConfig(scheduler=SchedulerConfig(scheduler_type=SchedulerType.PRIORITY))
    engine = DiffusersEngine(tiny_flux_dir, max_batch_size=8, config=config)
    yield engine
    engine.shutdown()


@pytest.fixture()
def limit(engine) -> Iterator:
    """Set the engine's batch limit for one test."""

    def set_limit(n: int) -> None:
        engine.loop.limit = n

    yield set_limit
    engine.loop.limit = 8


def params(seed: int, steps: int = 8, **extra: object) -> ImageParams:
    return ImageParams(**SIZE, steps=steps, seed=seed, **extra)  # type: ignore[arg-type]


def generate(engine, rid: str, prompt: str, p: ImageParams, init_image=None, **kw) -> ImageOutput:
    return engine.generate(rid, prompt, p, kw.pop("timeout_s", 60.0), init_image, **kw)


def pixels(out: ImageOutput) -> np.ndarray:
    return np.asarray(out.image, dtype=np.float64)


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        try:
            box["out"] = fn(*args, **kwargs)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def test_concurrent_requests_share_steps_and_keep_their_own_images(engine, limit) -> None:
    limit(8)
    prompts = [f"a lighthouse, variant {i}" for i in range(8)]
    alone = [generate(engine, f"alone{i}", p, params(i)) for i, p in enumerate(prompts)]
    runs = [in_thread(generate, engine, f"batch{i}", p, params(i)) for i, p in enumerate(prompts)]
    for thread, _ in runs:
        thread.join(60)
    batched = [box["out"] for _, box in runs]
    assert max(out.max_batch for out in batched) == 8
    assert all(out.denoise_steps == 8 and out.steps_run == 8 for out in batched)
    diffs = [
        np.abs(pixels(a) - pixels(b)).mean() / 255 for a, b in zip(alone, batched, strict=True)
    ]
    assert max(diffs) <= 1 / 255, diffs


def test_a_preempted_request_resumes_with_identical_pixels(engine, limit) -> None:
    limit(1)
    low_params = params(seed=7, steps=16)
    reference = generate(engine, "low-ref", "a red barn", low_params)
    started = threading.Event()

    def low_progress(info) -> None:
        if info["step"] >= 3:
            started.set()

    low_ticket = StepTicket("low", priority_class="low", on_progress=low_progress)
    low_thread, low = in_thread(
        generate, engine, "low", "a red barn", low_params, ticket=low_ticket
    )
    assert started.wait(30)
    high = generate(
        engine,
        "high",
        "a blue boat",
        params(seed=8),
        ticket=StepTicket("high", priority_class="high"),
    )
    low_thread.join(60)
    out = low["out"]
    assert out.preemptions == 1 and out.timings["paused_s"] > 0
    assert high.preemptions == 0 and out.denoise_steps == 16
    assert np.array_equal(pixels(out), pixels(reference))  # same batch sizes: bit-identical
    # The pause is about the high request's own denoising time.
    assert out.timings["paused_s"] < high.timings["total_s"] + 0.5


def test_a_waiting_request_past_its_deadline_never_runs_a_step(engine, limit) -> None:
    limit(1)
    stepping = threading.Event()
    ticket = StepTicket("long", on_progress=lambda info: stepping.set())
    long_thread, long_box = in_thread(
        generate, engine, "long", "slow", params(1, steps=200), ticket=ticket
    )
    assert stepping.wait(30)  # the long request holds the only slot
    start = time.monotonic()
    with pytest.raises(RequestTimeoutError, match="after 0 denoising steps"):
        generate(engine, "late", "never", params(2), timeout_s=0.5)
    assert time.monotonic() - start < 2.0
    long_thread.join(60)
    assert long_box["out"].denoise_steps == 200


def test_a_cancelled_request_leaves_at_the_next_step(engine, limit) -> None:
    limit(8)
    cancel = threading.Event()
    seen: list[dict] = []

    def progress(info) -> None:
        seen.append(dict(info))
        if info["step"] == 3:
            cancel.set()

    ticket = StepTicket("gone", cancelled=cancel.is_set, on_progress=progress)
    with pytest.raises(RequestCancelledError, match="after 3 denoising steps"):
        generate(engine, "gone", "cancel me", params(3, steps=40), ticket=ticket)
    assert seen[:3] == [{"step": k, "steps": 40} for k in (1, 2, 3)]
    assert engine.step_scheduler.get_queue_size() == 0  # the slot is free again
    assert generate(engine, "after", "next", params(4, steps=2)).denoise_steps == 2


def test_img2img_and_true_cfg_join_a_batch(engine, limit) -> None:
    from PIL import Image

    limit(8)
    init = Image.new("RGB", (128, 128), (200, 40, 40))
    jobs = [
        ("plain", "a field", params(5), None),
        ("i2i", "a field at dusk", params(6, strength=0.5), init),
        ("cfg", "a field", params(7, negative_prompt="fog"), None),
    ]
    alone = {rid: generate(engine, rid + "-alone", p, pr, img) for rid, p, pr, img in jobs}
    runs = {rid: in_thread(generate, engine, rid, p, pr, img) for rid, p, pr, img in jobs}
    for rid, (thread, box) in runs.items():
        thread.join(60)
        out = box["out"]
        assert out.denoise_steps == alone[rid].denoise_steps
        assert np.abs(pixels(out) - pixels(alone[rid])).mean() / 255 <= 1 / 255
    assert runs["i2i"][1]["out"].denoise_steps == 4  # img2img joins at its start step
    assert max(box["out"].max_batch for _, box in runs.values()) >= 2


def test_step_cached_requests_run_alone(engine, limit) -> None:
    from workers.engines.base import StepCacheSettings

    limit(8)
    cached = params(9, step_cache=StepCacheSettings("first_block", {"threshold": 1.0}))
    runs = [in_thread(generate, engine, f"fb{i}", "x", replace(cached, seed=i)) for i in range(2)]
    runs.append(in_thread(generate, engine, "plain", "x", params(11)))
    for thread, _ in runs:
        thread.join(60)
    outs = [box["out"] for _, box in runs]
    assert [out.max_batch for out in outs[:2]] == [1, 1]
