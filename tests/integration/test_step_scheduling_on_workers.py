"""The step scheduler on a real diffusion worker (`celery -A omni_tasks worker -Q
diffusion`, defaults: batches of 8, a lookahead of 2, priority policy), through Redis:
batching, preemption, the starvation bound, deadlines, cancellation and progress."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from celery.exceptions import TaskRevokedError
from celery.result import AsyncResult
from conftest import clean_redis, start_ready_workers
from helpers import KEYS, eventually, state_and_info
from PIL import Image

from omni_tasks import cancel, generate_image
from omni_tasks.coordination.client import get_redis
from omni_tasks.errors import RequestTimeoutError

TIMEOUT = 120
STARVATION_S = 2.0
SIZE = {"width": 128, "height": 128}


@pytest.fixture(scope="module")
def worker(tiny_models, run_dir: Path) -> Iterator:
    clean_redis()
    env = {
        "OMNI_SCHEDULER__STARVATION_S": str(STARVATION_S),
        # Progress written early and often: a long request shows several steps however
        # fast the machine runs it.
        "OMNI_PROGRESS_FIRST_AFTER_S": "0.2",
        "OMNI_PROGRESS_INTERVAL_S": "0.1",
    }
    [worker] = start_ready_workers(["diffusion"], run_dir / "logs", env=env)
    yield worker
    worker.stop()
    clean_redis()


def send(prompt: str, steps: int, priority: str = "normal", **extra: object) -> AsyncResult:
    return generate_image.delay(prompt=prompt, steps=steps, priority=priority, **SIZE, **extra)


def wait_progress(result: AsyncResult, step: int = 1) -> dict:
    def reached() -> dict | None:
        state, info = state_and_info(result)
        if state == "PROGRESS" and isinstance(info, dict) and info["step"] >= step:
            return info
        return None

    info = eventually(reached, timeout_s=60, interval_s=0.02)
    assert info, f"no progress to step {step}: {result.state} {result.info}"
    return info


def wait_started(result: AsyncResult) -> None:
    """Until its task has started on the worker (held: running or waiting for a slot)."""
    assert eventually(lambda: result.state in ("STARTED", "PROGRESS"), 60, 0.01), result.state


def pixels(result: dict) -> np.ndarray:
    with Image.open(result["image_path"]) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def stat(name: str) -> int:
    return int(get_redis().hget(KEYS.stats("diffusion"), name) or 0)


def test_eight_compatible_requests_run_as_one_batch(worker) -> None:
    results = [send(f"batch prompt {i}", steps=30, seed=i) for i in range(8)]
    outs = [r.get(TIMEOUT) for r in results]
    assert max(out["max_batch"] for out in outs) == 8
    assert all(out["denoise_steps"] == 30 and out["preemptions"] == 0 for out in outs)


def test_progress_is_visible_through_async_result(worker) -> None:
    # Long enough (a second or more) for several throttled writes at the fixture's pace.
    result = generate_image.delay(prompt="progress please", steps=100, width=256, height=256)
    first = wait_progress(result, 1)
    later = wait_progress(result, first["step"] + 1)
    assert first["steps"] == later["steps"] == 100
    assert result.get(TIMEOUT)["denoise_steps"] == 100


def test_a_high_class_arrival_preempts_and_the_paused_image_is_unchanged(
    worker, tiny_flux_dir: Path
) -> None:
    from workers.engines.base import ImageParams
    from workers.engines.diffusers_engine import DiffusersEngine

    lows = [send(f"low {i}", steps=60, priority="low", seed=i) for i in range(8)]
    wait_progress(lows[-1])  # all eight hold the batch
    high = send("urgent", steps=8, priority="high").get(TIMEOUT)
    outs = [r.get(TIMEOUT) for r in lows]
    paused = [out for out in outs if out["preemptions"]]
    assert len(paused) == 1 and paused[0]["timings"]["paused_s"] > 0
    assert high["preemptions"] == 0 and high["max_batch"] == 8
    # The paused request's pixels are those of the same request run on its own (here, by
    # an engine of the same checkpoint: a repeat on the worker would be a cache hit).
    i = outs.index(paused[0])
    engine = DiffusersEngine(tiny_flux_dir, max_batch_size=1)
    try:
        alone = engine.generate("alone", f"low {i}", ImageParams(**SIZE, steps=60, seed=i), 60)
    finally:
        engine.shutdown()
    reference = np.asarray(alone.image, dtype=np.float64)
    assert np.abs(pixels(paused[0]) - reference).mean() / 255 <= 1 / 255


def test_starvation_bound_a_paused_low_request_resumes_within_the_bound(worker) -> None:
    low = send("patient", steps=80, priority="low")
    wait_progress(low)
    highs = [send(f"rush {i}", steps=40, priority="high", seed=i) for i in range(16)]
    low_out = low.get(TIMEOUT)
    high_outs = [r.get(TIMEOUT) for r in highs]
    assert low_out["preemptions"] >= 1
    # Held STARVATION_S, it outranks every later arrival: paused no longer than that.
    assert low_out["timings"]["paused_s"] <= STARVATION_S + 0.5
    last_high_end = max(o["timings"]["started_at"] + o["timings"]["run_s"] for o in high_outs)
    low_end = low_out["timings"]["started_at"] + low_out["timings"]["run_s"]
    assert low_end < last_high_end  # the stream of high requests did not starve it


def test_a_held_request_past_its_deadline_fails_without_a_step(worker) -> None:
    expired_before = stat("expired")
    busy = [send(f"busy {i}", steps=60, priority="normal", seed=i) for i in range(8)]
    wait_progress(busy[-1])
    late = send("too late", steps=8, priority="low", timeout_s=1.0)
    with pytest.raises(RequestTimeoutError, match="after 0 denoising steps"):
        late.get(TIMEOUT)
    for r in busy:
        r.get(TIMEOUT)
    assert eventually(lambda: stat("expired") == expired_before + 1)


def test_a_request_cancelled_while_running_leaves_at_the_next_step(worker) -> None:
    cancelled_before = stat("cancelled")
    result = generate_image.delay(prompt="cancel me", steps=100, width=384, height=384)
    wait_progress(result, 2)
    start = time.monotonic()
    cancel(result.id)
    with pytest.raises(TaskRevokedError):
        result.get(TIMEOUT)
    assert time.monotonic() - start < 5.0
    assert result.state == "REVOKED"
    assert eventually(lambda: stat("cancelled") == cancelled_before + 1)
    # Its slot is free: the next request runs at once.
    assert send("next", steps=2).get(TIMEOUT)["denoise_steps"] == 2


def test_an_unstarted_held_request_yields_to_a_higher_priority_message(worker) -> None:
    # Ten held (eight running, two waiting) and two more queued: every slot is taken.
    lows = [send(f"backlog {i}", steps=100, priority="low", seed=i) for i in range(12)]
    wait_started(lows[9])
    # Eight of the ten held run steps; the lookahead holds two that cannot start yet.
    stepping = eventually(lambda: [r.state for r in lows[:10]].count("PROGRESS") == 8, 60)
    assert stepping, [r.state for r in lows]
    sent = time.time()
    high = send("jump the queue", steps=8, priority="high").get(TIMEOUT)
    # A waiting low request was handed back, so the high one started at once ...
    assert high["timings"]["started_at"] - sent < 1.0  # the first low ends after ~3 s
    outs = [r.get(TIMEOUT) for r in lows]  # ... and nothing handed back was lost
    assert all(out["denoise_steps"] == 100 for out in outs)
    overtook = [
        o for o in outs if sent < o["timings"]["started_at"] < high["timings"]["started_at"]
    ]
    assert overtook == []
