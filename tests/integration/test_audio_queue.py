"""Sounds through the queue, on one real worker serving the tiny Stable Audio
(`OMNI_DIFFUSION__MODEL=tiny-stable-audio celery -A omni_tasks worker -Q diffusion`):
`generate_audio.delay()` gives a WAV (or FLAC) that soundfile decodes to the model's
channels and rate at the length asked for; an exact repeat is the same file bytes from
the DiT cache; a high sound preempts a running low one at a step, and the low one
resumes to the samples it gives alone.

The worker runs one request a step (`max_batch_size` 1): sounds all share one latent
shape, so with more slots a high sound would join the low one's steps rather than
pause it (the family tests show sounds sharing steps)."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from celery.result import AsyncResult
from conftest import MODELS_CACHE, clean_redis, start_ready_workers
from helpers import eventually

from omni_tasks import generate_audio

pytestmark = pytest.mark.slow
TIMEOUT = 180
MODEL = "tiny-stable-audio"
RATE, CHANNELS = 44100, 2
SHORT = {"seconds": 1, "steps": 4}


@pytest.fixture(scope="module")
def audio_worker(run_dir: Path) -> Iterator[str]:
    """One worker serving tiny-stable-audio, one request a step."""
    from workers.models import build_tiny_model

    build_tiny_model(MODEL, MODELS_CACHE / MODEL)
    clean_redis()
    env = {
        "OMNI_DIFFUSION__MODEL": MODEL,
        "OMNI_DIFFUSION__MAX_BATCH_SIZE": "1",
        "OMNI_PROGRESS_FIRST_AFTER_S": "0.05",
        "OMNI_PROGRESS_INTERVAL_S": "0.05",
    }
    try:
        [worker] = start_ready_workers(["diffusion"], run_dir / "logs-audio", env=env)
        yield worker.hostname
        worker.stop()
    finally:
        clean_redis()


#: What the long sound gives alone, never preempted nor batched: an engine of the same
#: checkpoint in a fresh process, so that its torch threads are a worker's (vLLM, loaded by
#: earlier tests in this process, pins torch to one thread, and a sum split over other
#: threads rounds differently).
ALONE = """
import sys
from pathlib import Path
from workers.audio import encode_audio
from workers.engines.base import ImageParams
from workers.engines.diffusers_engine import DiffusersEngine

engine = DiffusersEngine(Path(sys.argv[1]), max_batch_size=1)
params = ImageParams(steps=100, guidance=7.0, seed=11, audio_seconds=2.0)  # the default
own = engine.generate("alone", "a long drone", params, 180)
Path(sys.argv[2]).write_bytes(encode_audio(own.audio, own.sample_rate, "wav"))
engine.shutdown()
"""


def alone_wav(out: Path) -> bytes:
    subprocess.run(
        [sys.executable, "-c", ALONE, str(MODELS_CACHE / MODEL), str(out)],
        check=True,
        cwd=Path(__file__).parents[2],
        timeout=TIMEOUT,
    )
    return out.read_bytes()


def read(result: dict[str, Any]) -> tuple[np.ndarray, int]:
    """The result's file: (samples, channels) float64 and its rate."""
    data, rate = soundfile.read(io.BytesIO(Path(result["audio_path"]).read_bytes()))
    return data, rate


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_a_sound_through_the_queue(audio_worker: str, fmt: str) -> None:
    out = generate_audio.delay(
        prompt="rain on a tin roof", seed=1, response_format=fmt, **SHORT
    ).get(TIMEOUT)
    assert out["request_type"] == "audio" and out["model"] == MODEL
    assert (out["format"], out["sample_rate"], out["channels"]) == (fmt, RATE, CHANNELS)
    assert out["duration_s"] == 1.0 and out["denoise_steps"] == 4
    assert out["audio_path"].endswith(f".{fmt}") and out["cache"]["latents"] == "miss"
    samples, rate = read(out)
    assert rate == RATE and samples.shape == (RATE, CHANNELS)
    assert np.abs(samples).max() > 0


def test_an_exact_repeat_is_the_same_file_from_the_cache(audio_worker: str) -> None:
    fields = {"prompt": "a distant bell", "seed": 7, **SHORT}
    first = generate_audio.delay(**fields).get(TIMEOUT)
    again = generate_audio.delay(**fields).get(TIMEOUT)
    assert first["cache"]["latents"] == "miss" and again["cache"]["latents"] == "hit"
    assert again["steps_run"] == 0
    assert (again["sample_rate"], again["channels"], again["duration_s"]) == (RATE, CHANNELS, 1.0)
    assert Path(first["audio_path"]).read_bytes() == Path(again["audio_path"]).read_bytes()


def test_a_high_sound_preempts_a_low_one_which_resumes_to_its_own_samples(
    audio_worker: str, tmp_path: Path
) -> None:
    long = {"prompt": "a long drone", "seed": 11, "seconds": 2, "steps": 100}
    low = generate_audio.delay(priority="low", **long)
    assert eventually(
        lambda: low.state == "PROGRESS" and AsyncResult(low.id).info["step"] >= 3, 60, 0.005
    )
    high = generate_audio.delay(prompt="urgent", seed=2, priority="high", **SHORT).get(TIMEOUT)
    sound = low.get(TIMEOUT)
    sound_ended = sound["timings"]["started_at"] + sound["timings"]["run_s"]
    assert high["timings"]["first_step_at"] < sound_ended
    assert sound["preemptions"] >= 1 and high["preemptions"] == 0
    assert sound["timings"]["paused_s"] > 0
    expected = alone_wav(tmp_path / "alone.wav")
    assert Path(sound["audio_path"]).read_bytes() == expected  # exact resume
