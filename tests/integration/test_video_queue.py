"""Videos through the queue, on one real worker serving the tiny Wan
(`OMNI_DIFFUSION__MODEL=tiny-wan celery -A omni_tasks worker -Q diffusion`):
`generate_video.delay()` gives an MP4 that PyAV decodes to the frames asked for, with
progress `{step, steps}` while it runs; an exact repeat is the same MP4 bytes from the
DiT cache; a foreign Celery client sends `omni_tasks.generate_video` by name; a high
image preempts a running low video at a step, and the video resumes to the MP4 it gives
alone; same-shape videos share steps with their own frames;
a video is cancelled or expires at a step; a LoRA adapter styles a video."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery.result import AsyncResult
from conftest import MODELS_CACHE, clean_redis, start_ready_workers
from helpers import eventually, foreign, state_and_info
from PIL import Image

from omni_tasks import (
    ConfigError,
    RequestTimeoutError,
    cancel,
    generate_image,
    generate_video,
    get_config,
    set_config,
)
from workers.engines.base import ImageParams
from workers.videos import decode_mp4, encode_mp4

pytestmark = pytest.mark.slow
TIMEOUT = 180
MODEL = "tiny-wan"
SHORT = {"num_frames": 9, "width": 64, "height": 64, "steps": 4}
#: A long low video: many steps, each long enough to measure a wait against.
LONG = {"num_frames": 33, "width": 96, "height": 96, "steps": 60}


@pytest.fixture(scope="module")
def wan_worker(tiny_models, run_dir: Path) -> Iterator[str]:
    """One worker serving tiny-wan, with a LoRA adapter "ink" of its own."""
    original = get_config()
    loras = {"ink": "tiny-wan-lora-ink"}  # built on first use
    set_config(replace(original, loras=loras))
    clean_redis()
    env = {
        "OMNI_DIFFUSION__MODEL": MODEL,
        "OMNI_LORAS": json.dumps(loras),
        "OMNI_PROGRESS_FIRST_AFTER_S": "0.05",
        "OMNI_PROGRESS_INTERVAL_S": "0.05",
        # A pool default the Wan family does not run: requests that name no step cache
        # run without one; one that names it is refused.
        "OMNI_DIFFUSION__STEP_CACHE": "taylorseer",
    }
    try:
        [worker] = start_ready_workers(["diffusion"], run_dir / "logs-video", env=env)
        yield worker.hostname
        worker.stop()
    finally:
        set_config(original)
        clean_redis()


@pytest.fixture(scope="module")
def alone(wan_worker: str) -> Iterator[Any]:
    """An engine of the same checkpoint in this process, one request per step: what a
    video gives alone, never preempted nor batched."""
    from workers.engines.diffusers_engine import DiffusersEngine

    engine = DiffusersEngine(MODELS_CACHE / MODEL, max_batch_size=1)
    yield engine
    engine.shutdown()


def alone_mp4(engine: Any, prompt: str, seed: int, fields: dict[str, int]) -> bytes:
    """The MP4 a worker writes for the video computed alone (the same encoder)."""
    params = ImageParams(**fields, seed=seed, guidance=3.5)
    return encode_mp4(engine.generate("alone", prompt, params, TIMEOUT).frames, fps=16)


def frames_of(result: dict[str, Any]) -> np.ndarray:
    frames, _ = decode_mp4(Path(result["video_path"]).read_bytes())
    return frames.astype(np.int64)


def test_a_video_through_the_queue(wan_worker: str) -> None:
    sent = generate_video.delay(prompt="a paper boat on a pond", seed=3, **SHORT)
    steps: list[int] = []

    def progressed() -> bool:
        state, info = state_and_info(sent)
        if state == "PROGRESS" and isinstance(info, dict):
            steps.append(int(info["step"]))
            assert info["steps"] == SHORT["steps"]
        return sent.ready()

    eventually(progressed, TIMEOUT, 0.01)
    out = sent.get(TIMEOUT)
    assert out["request_type"] == "video" and out["model"] == MODEL
    assert (out["num_frames"], out["fps"], out["duration_s"]) == (9, 16, 9 / 16)
    assert (out["width"], out["height"], out["denoise_steps"]) == (64, 64, 4)
    assert out["cache"]["latents"] == "miss" and out["preemptions"] == 0
    frames, rate = decode_mp4(Path(out["video_path"]).read_bytes())
    assert frames.shape == (9, 64, 64, 3) and rate == 16
    assert Path(out["thumbnail_path"]).read_bytes().startswith(b"\x89PNG")
    assert Path(out["spritesheet_path"]).read_bytes().startswith(b"\xff\xd8")
    assert steps and all(1 <= s <= 4 for s in steps)


def test_an_exact_repeat_is_the_same_mp4_from_the_cache(wan_worker: str) -> None:
    fields = {"prompt": "a quiet harbour", "seed": 7, **SHORT}
    first = generate_video.delay(**fields).get(TIMEOUT)
    again = generate_video.delay(**fields).get(TIMEOUT)
    assert first["cache"]["latents"] == "miss" and again["cache"]["latents"] == "hit"
    assert again["steps_run"] == 0
    for name in ("video_path", "thumbnail_path", "spritesheet_path"):
        assert Path(first[name]).read_bytes() == Path(again[name]).read_bytes()


def test_a_foreign_client_sends_a_video_by_name(wan_worker: str) -> None:
    spec = [
        {
            "task": "omni_tasks.generate_video",
            "kwargs": {"prompt": "a kite", "seconds": 0.5, "fps": 8, **SHORT} | {"seed": 1},
            "queue": "diffusion",
        },
        {"task": "omni_tasks.generate_video", "kwargs": {"prompt": "x", "num_frames": 8}},
    ]
    spec[0]["kwargs"].pop("num_frames")
    spec[1]["queue"] = "diffusion"
    ids = foreign("send", json.dumps(spec))
    good, bad = foreign("wait", json.dumps(ids))
    assert "result" in good, good
    assert good["result"]["num_frames"] == 5 and good["result"]["fps"] == 8
    assert bad["error"] == "RequestValidationError" and "num_frames" in json.dumps(bad)


def test_a_high_image_starts_within_a_step_and_the_video_resumes(
    wan_worker: str, alone: Any
) -> None:
    low = generate_video.delay(prompt="a long river", seed=11, priority="low", **LONG)
    assert eventually(
        lambda: low.state == "PROGRESS" and AsyncResult(low.id).info["step"] >= 3, 60, 0.005
    )
    image = generate_image.delay(
        prompt="urgent", model=MODEL, width=64, height=64, steps=2, priority="high"
    ).get(TIMEOUT)
    video = low.get(TIMEOUT)
    # The image ran while the video was paused (bench/p10_video.py measures the wait).
    video_ended = video["timings"]["started_at"] + video["timings"]["run_s"]
    assert image["timings"]["first_step_at"] < video_ended
    assert video["preemptions"] >= 1 and image["preemptions"] == 0
    assert video["timings"]["paused_s"] > 0
    resumed = Path(video["video_path"]).read_bytes()
    assert resumed == alone_mp4(alone, "a long river", 11, LONG)  # exact resume


def test_same_shape_videos_share_steps_with_their_own_frames(wan_worker: str, alone: Any) -> None:
    fields = {**SHORT, "steps": 12}
    sent = [generate_video.delay(prompt="two lanterns", seed=20 + i, **fields) for i in range(2)]
    outs = [r.get(TIMEOUT) for r in sent]
    assert [out["max_batch"] for out in outs] == [2, 2]
    for i, out in enumerate(outs):
        params = ImageParams(**fields, seed=20 + i, guidance=3.5)
        own = alone.generate("alone", "two lanterns", params, TIMEOUT).frames
        # The thumbnail is the first frame, lossless: within float rounding of alone.
        with Image.open(out["thumbnail_path"]) as thumbnail:
            first = np.asarray(thumbnail.convert("RGB"), dtype=np.int64)
        assert np.abs(first - own[0].astype(np.int64)).max() <= 2
        # Every frame through H.264 (lossy: a level apart before may be a few after):
        # batching moves the frames far less than the codec itself does.
        decoded, _ = decode_mp4(encode_mp4(own, fps=16))
        batching = np.abs(decoded.astype(np.int64) - frames_of(out)).mean()
        codec = np.abs(decoded.astype(np.int64) - own.astype(np.int64)).mean()
        assert batching < 0.5 * codec, (batching, codec)


def test_a_video_is_cancelled_or_expires_at_a_step(wan_worker: str) -> None:
    running = generate_video.delay(prompt="to be cancelled", seed=5, **LONG)
    assert eventually(lambda: running.state == "PROGRESS", 60, 0.005)
    cancel(running.id)
    assert eventually(lambda: running.state == "REVOKED", 30, 0.02)
    with pytest.raises(RequestTimeoutError):
        generate_video.delay(prompt="too slow", seed=6, timeout_s=0.5, **LONG).get(TIMEOUT)


def test_the_pools_step_cache_applies_where_the_family_runs_it(wan_worker: str) -> None:
    out = generate_video.delay(prompt="a windmill", seed=2, **SHORT).get(TIMEOUT)
    assert out["steps_run"] == SHORT["steps"]  # no step skipped: it ran without one
    asked = generate_video.delay(prompt="a windmill", seed=2, step_cache="taylorseer", **SHORT)
    with pytest.raises(ConfigError) as err:
        asked.get(TIMEOUT)
    assert err.value.field == "step_cache"


def test_a_lora_adapter_styles_a_video(wan_worker: str) -> None:
    fields = {"prompt": "a stone bridge", "seed": 9, **SHORT}
    base = generate_video.delay(**fields).get(TIMEOUT)
    styled = generate_video.delay(**fields, lora=["ink"]).get(TIMEOUT)
    assert styled["lora"][0]["name"] == "ink" and styled["cache"]["latents"] == "miss"
    assert np.abs(frames_of(base) - frames_of(styled)).max() > 2
