"""The Stable Audio family in one process (`DiffusersEngine` on tiny-stable-audio): the
checkpoint loads as the real one does, a clip is the pipeline's own samples (with and
without a negative prompt, with and without CFG), returned latents decode to the same
samples, sounds sent together share steps with their own samples, and what the model
cannot take is refused naming the field."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import MODELS_CACHE

from omni_tasks.errors import RequestValidationError
from workers.engines.base import ImageParams

# The scheduler's last step is below its Brownian tree's sigma_min, as in the real
# pipeline; the family silences this, but pytest restores the filters every test.
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
PROMPT = "rain on a tin roof"
SOUND = ImageParams(steps=4, guidance=7.0, seed=3, audio_seconds=1.0)


@pytest.fixture(scope="module")
def model_dir() -> Any:
    from workers.models import build_tiny_model

    return build_tiny_model("tiny-stable-audio", MODELS_CACHE / "tiny-stable-audio")


@pytest.fixture(scope="module")
def engine(model_dir) -> Iterator[Any]:
    from workers.engines.diffusers_engine import DiffusersEngine

    eng = DiffusersEngine(model_dir, max_batch_size=8)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def pipeline(model_dir) -> Any:
    """The checkpoint as anyone loads Stable Audio Open: `from_pretrained(path)`."""
    from diffusers import StableAudioPipeline

    pipe = StableAudioPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_audio(pipe: Any, prompt: str, params: ImageParams) -> np.ndarray:
    """The pipeline's own call for `params`: (channels, samples) float32."""
    import torch

    audio = pipe(
        prompt,
        negative_prompt=params.negative_prompt,
        audio_end_in_s=params.audio_seconds,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance,
        generator=torch.Generator().manual_seed(params.seed),
    ).audios[0]
    return audio.numpy()


def test_the_checkpoint_loads_as_stable_audio_open(pipeline, engine) -> None:
    from diffusers import (
        AutoencoderOobleck,
        CosineDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioProjectionModel,
    )
    from transformers import T5EncoderModel

    assert isinstance(pipeline.transformer, StableAudioDiTModel)
    assert isinstance(pipeline.vae, AutoencoderOobleck)
    assert isinstance(pipeline.projection_model, StableAudioProjectionModel)
    assert isinstance(pipeline.text_encoder, T5EncoderModel)
    assert isinstance(pipeline.scheduler, CosineDPMSolverMultistepScheduler)
    family = engine.family
    assert (family.name, family.media, family.sample_rate, family.audio_channels) == (
        "stable-audio",
        "audio",
        44100,
        2,
    )
    assert family.max_seconds > 2.0  # the default length fits


@pytest.mark.parametrize(
    "change",
    [{}, {"negative_prompt": "low quality", "audio_seconds": 1.5}, {"guidance": 1.0}],
    ids=["cfg", "negative-prompt", "no-cfg"],
)
def test_a_sound_is_the_pipelines_own_samples(engine, pipeline, change) -> None:
    params = dataclasses.replace(SOUND, **change)
    out = engine.generate("s", PROMPT, params, 120)
    assert out.image is None and out.sample_rate == 44100
    assert out.audio is not None and out.audio.dtype == np.float32
    assert out.audio.shape == (2, int(params.audio_seconds * 44100))
    assert out.steps_run == 4 and out.denoise_steps == 4
    assert out.latents is not None and tuple(out.latents.shape) == (1, 8, 384)
    assert np.array_equal(out.audio, pipeline_audio(pipeline, PROMPT, params))


def test_returned_latents_decode_to_the_same_samples(engine) -> None:
    first = engine.generate("a", PROMPT, SOUND, 120)
    again = engine.generate("b", "ignored", SOUND, 120, latents=first.latents)
    assert again.steps_run == 0 and np.array_equal(again.audio, first.audio)


def test_sounds_sent_together_share_steps_and_keep_their_own_samples(engine) -> None:
    # Different lengths, guidance and steps: one window, so they share steps all the same.
    params = [
        dataclasses.replace(SOUND, seed=11),
        dataclasses.replace(SOUND, seed=12, audio_seconds=2.0, guidance=1.0, steps=5),
    ]
    outs: dict[int, Any] = {}

    def run(i: int) -> None:
        outs[i] = engine.generate(f"t{i}", f"{PROMPT} {i}", params[i], 120)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [outs[i].max_batch for i in range(2)] == [2, 2]
    for i in range(2):
        alone = engine.generate(f"alone{i}", f"{PROMPT} {i}", params[i], 120)
        assert alone.max_batch == 1 and alone.audio.shape == outs[i].audio.shape
        # the float rounding of a larger matrix product
        assert np.abs(alone.audio - outs[i].audio).max() <= 1e-4


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"audio_seconds": 30.0}, "seconds"),  # beyond the tiny model's window
        ({"audio_seconds": None}, "model"),  # an image request
        ({"step_cache": None}, "step_cache"),
    ],
)
def test_what_stable_audio_cannot_take_is_refused_naming_the_field(engine, change, field) -> None:
    from omni_tasks.errors import ConfigError
    from workers.engines.base import StepCacheSettings

    if "step_cache" in change:
        change = {"step_cache": StepCacheSettings(mode="taylorseer")}
    with pytest.raises((RequestValidationError, ConfigError)) as err:
        engine.generate("bad", PROMPT, dataclasses.replace(SOUND, **change), 30)
    assert err.value.field == field


def test_an_image_model_refuses_a_sound(tiny_flux_dir) -> None:
    from workers.engines.diffusers_engine import DiffusersEngine

    eng = DiffusersEngine(tiny_flux_dir)
    try:
        with pytest.raises(RequestValidationError, match="generate_image") as err:
            eng.generate("bad", PROMPT, SOUND, 30)
        assert err.value.field == "model"
    finally:
        eng.shutdown()
