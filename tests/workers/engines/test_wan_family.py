"""The Wan family in one process (`DiffusersEngine` on the tiny Wan checkpoints): the
frames are the pipeline's own, videos sent together share steps with their own frames,
image-to-video runs from an inline image, a preview is the first frame, a video that can
never fit is refused at once naming frames and size, and what a Wan model cannot take
is refused naming the field."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import MODELS_CACHE
from PIL import Image

from omni_tasks.config import get_config
from omni_tasks.errors import RequestValidationError, ResourceError
from workers.engines.base import ImageParams

PROMPT = "a paper boat on a pond"
VIDEO = ImageParams(width=64, height=64, steps=4, guidance=5.0, seed=3, num_frames=9)
#: `VIDEO` as the pipelines' own call takes it.
PIPELINE_ARGS = {
    "prompt": PROMPT,
    "num_frames": VIDEO.num_frames,
    "width": VIDEO.width,
    "height": VIDEO.height,
    "num_inference_steps": VIDEO.steps,
    "guidance_scale": VIDEO.guidance,
    "seed": VIDEO.seed,
}


@pytest.fixture(scope="module")
def wan(tiny_models) -> Iterator[Any]:
    from workers.engines.diffusers_engine import DiffusersEngine

    eng = DiffusersEngine(MODELS_CACHE / "tiny-wan", max_batch_size=8)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def wan_i2v(tiny_models) -> Iterator[Any]:
    from workers.engines.diffusers_engine import DiffusersEngine

    eng = DiffusersEngine(MODELS_CACHE / "tiny-wan-i2v", max_batch_size=8)
    yield eng
    eng.shutdown()


def pipeline_frames(pipeline: Any, **kwargs: Any) -> np.ndarray:
    """The pipeline's own call, its float frames as uint8 the way diffusers rounds them."""
    import torch

    frames = pipeline(
        output_type="np", generator=torch.Generator().manual_seed(kwargs.pop("seed")), **kwargs
    ).frames[0]
    return np.asarray((frames * 255).round(), dtype=np.uint8)


def load(name: str, class_name: str) -> Any:
    import diffusers
    import torch

    pipe = getattr(diffusers, class_name).from_pretrained(MODELS_CACHE / name, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_families_come_from_the_checkpoints(wan, wan_i2v) -> None:
    assert (wan.family.name, wan_i2v.family.name) == ("wan", "wan-i2v")
    assert wan.family.media == "video" and wan.size_multiple == 16


def test_a_video_is_the_pipelines_own_frames(wan) -> None:
    out = wan.generate("v", PROMPT, VIDEO, 120)
    assert out.frames is not None and out.frames.shape == (9, 64, 64, 3)
    assert out.frames.dtype == np.uint8 and out.steps_run == 4 and out.denoise_steps == 4
    assert out.latents is not None and tuple(out.latents.shape) == (1, 16, 3, 8, 8)
    assert np.array_equal(np.asarray(out.image), out.frames[0])  # the thumbnail frame
    expected = pipeline_frames(load("tiny-wan", "WanPipeline"), **PIPELINE_ARGS)
    assert np.array_equal(out.frames, expected)


def test_returned_latents_decode_to_the_same_frames(wan) -> None:
    first = wan.generate("a", PROMPT, VIDEO, 120)
    again = wan.generate("b", "ignored", VIDEO, 120, latents=first.latents)
    assert again.steps_run == 0 and np.array_equal(again.frames, first.frames)


def test_videos_sent_together_share_steps_and_keep_their_own_frames(wan) -> None:
    params = [dataclasses.replace(VIDEO, seed=seed) for seed in (11, 12)]
    outs: dict[int, Any] = {}

    def run(i: int) -> None:
        outs[i] = wan.generate(f"t{i}", f"{PROMPT} {i}", params[i], 120)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [outs[i].max_batch for i in range(2)] == [2, 2]
    for i in range(2):
        alone = wan.generate(f"alone{i}", f"{PROMPT} {i}", params[i], 120)
        assert alone.max_batch == 1
        diff = np.abs(alone.frames.astype(int) - outs[i].frames.astype(int))
        assert diff.max() <= 2  # the float rounding of a larger matrix product


def test_a_preview_is_the_first_frame(wan) -> None:
    out = wan.generate("p", PROMPT, VIDEO, 120)
    preview = wan.family.preview(out.latents, VIDEO)
    assert np.array_equal(np.asarray(preview), out.frames[0])


def test_an_image_request_on_a_video_model_is_one_frame(wan) -> None:
    params = ImageParams(width=64, height=48, steps=2, guidance=5.0, seed=4)
    out = wan.generate("img", PROMPT, params, 120)
    assert out.frames is None and out.image.size == (64, 48)
    one = wan.generate("one", PROMPT, dataclasses.replace(params, num_frames=1), 120)
    assert np.array_equal(np.asarray(out.image), one.frames[0])


def test_image_to_video_is_the_pipelines_own_frames(wan_i2v) -> None:
    image = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[:, None, None] * 4, (1, 64, 3)))
    out = wan_i2v.generate("i2v", PROMPT, VIDEO, 120, image)
    wan = load("tiny-wan-i2v", "WanImageToVideoPipeline")
    expected = pipeline_frames(wan, image=image, **PIPELINE_ARGS)
    assert out.frames.shape == (9, 64, 64, 3) and out.denoise_steps == 4
    assert np.abs(out.frames.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_frames": 8}, "num_frames"),  # not 4k+1
        ({"width": 72}, "width"),  # not a multiple of 16
    ],
)
def test_what_wan_cannot_take_is_refused_naming_the_field(wan, change, field) -> None:
    with pytest.raises(RequestValidationError) as err:
        wan.generate("bad", PROMPT, dataclasses.replace(VIDEO, **change), 30)
    assert err.value.field == field


def test_an_image_goes_to_image_to_video_only(wan, wan_i2v) -> None:
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    with pytest.raises(RequestValidationError) as err:
        wan.generate("t2v-image", PROMPT, VIDEO, 30, image)
    assert err.value.field == "image"
    with pytest.raises(RequestValidationError) as err:
        wan_i2v.generate("i2v-none", PROMPT, VIDEO, 30)
    assert err.value.field == "image"


def test_a_video_that_can_never_fit_fails_at_once_naming_frames_and_size(tiny_models) -> None:
    from workers.engines.diffusers_engine import DiffusersEngine

    base = get_config()
    small = dataclasses.replace(
        base, max_memory_gib=0.05, cache=dataclasses.replace(base.cache, max_memory_gib=0.001)
    )
    eng = DiffusersEngine(MODELS_CACHE / "tiny-wan", config=small)
    try:
        huge = dataclasses.replace(VIDEO, num_frames=257, width=1024, height=1024)
        with pytest.raises(ResourceError, match=r"a 257-frame 1024x1024 video needs .* budget"):
            eng.generate("huge", PROMPT, huge, 30)
        assert eng.generate("fits", PROMPT, VIDEO, 120).frames.shape == (9, 64, 64, 3)
    finally:
        eng.shutdown()
