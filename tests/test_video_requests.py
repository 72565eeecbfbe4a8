"""Video requests on the producer side: `num_frames` (4k+1) or `seconds` at `fps`, the
diffusers name `guidance_scale`, an optional first image, refusals that name the field,
the defaults of their model, their cache key and cost; and requests of other types keep
the digests they had before video existed."""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import pytest
from PIL import Image

from omni_tasks import RequestType, RequestValidationError, create_video_request
from omni_tasks.config import ModelEntry, get_config
from omni_tasks.errors import ConfigError
from omni_tasks.model_registry import check_model, dit_model
from omni_tasks.requests import create_diffusion_request, create_text_request
from omni_tasks.video_fields import DEFAULT_FPS, DEFAULT_FRAMES, MAX_FRAMES, nearest_frames


def png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_video_request_and_its_defaults() -> None:
    request = create_video_request("a boat", width=64, height=48, steps=3)
    assert request.request_type is RequestType.VIDEO
    assert (request.num_frames, request.fps) == (DEFAULT_FRAMES, DEFAULT_FPS)
    assert request.seed is not None  # fixed at the producer, like an image's
    message = request.to_message()
    assert message["num_frames"] == DEFAULT_FRAMES and "seconds" not in message
    assert request.dit_cost() == pytest.approx(3 * 64 * 48 * DEFAULT_FRAMES / 1e6)


@pytest.mark.parametrize(
    ("seconds", "fps", "frames"),
    [(2, 16, 33), (1, 16, 17), (0.5, 24, 13), (1.1, 10, 13), (0.01, 16, 1), (4, 16, 65)],
)
def test_seconds_become_the_nearest_4k_plus_1_frames(seconds, fps, frames) -> None:
    request = create_video_request("a boat", seconds=seconds, fps=fps)
    assert (request.num_frames, request.fps) == (frames, fps)
    assert (request.num_frames - 1) % 4 == 0 == (nearest_frames(seconds * fps) - 1) % 4


def test_the_same_video_asked_by_seconds_or_frames_is_one_request() -> None:
    by_seconds = create_video_request("a boat", request_id="same", seconds=2)
    by_frames = create_video_request("a boat", request_id="same", num_frames=33)
    assert by_seconds.fingerprint() == by_frames.fingerprint()
    assert by_seconds.generate_cache_key() == by_frames.generate_cache_key()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"num_frames": 8}, "num_frames"),
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": MAX_FRAMES + 4}, "num_frames"),
        ({"seconds": 0}, "seconds"),
        ({"seconds": "4"}, "seconds"),
        ({"seconds": True}, "seconds"),
        ({"seconds": 30}, "seconds"),
        ({"seconds": 2, "num_frames": 33}, "seconds"),
        ({"fps": 0}, "fps"),
        ({"fps": 61}, "fps"),
        ({"seconds": 1, "fps": 2.5}, "fps"),
        ({"guidance_scale": 5, "guidance": 4}, "guidance_scale"),
        ({"width": 70}, "width"),
        ({"image": "not base64!"}, "image"),
    ],
)
def test_bad_video_fields_are_refused_naming_the_field(fields, field) -> None:
    with pytest.raises(RequestValidationError) as err:
        create_video_request("a boat", **fields)
    assert err.value.field == field


def test_num_frames_refusal_names_the_nearest_counts() -> None:
    with pytest.raises(RequestValidationError, match=r"4k\+1.*13 or 17"):
        create_video_request("a boat", num_frames=15)


def test_guidance_scale_is_guidance() -> None:
    assert create_video_request("a boat", guidance_scale=5.0).guidance == 5.0


def test_other_types_refuse_the_video_fields() -> None:
    for fields, field in (({"num_frames": 9}, "num_frames"), ({"fps": 8}, "fps")):
        with pytest.raises(RequestValidationError) as err:
            create_diffusion_request("a boat", **fields)
        assert err.value.field == field
    with pytest.raises(RequestValidationError) as err:
        create_text_request("a boat", seconds=2)
    assert err.value.field == "seconds"


def test_image_to_video_takes_an_inline_image_in_its_key() -> None:
    plain = create_video_request("a boat", request_id="x")
    with_image = create_video_request("a boat", request_id="x", image=png_b64())
    assert with_image.image is not None
    assert plain.generate_cache_key() != with_image.generate_cache_key()


def test_frames_and_fps_are_in_the_cache_key() -> None:
    base = create_video_request("a boat", request_id="k", num_frames=9)
    keys = {
        base.generate_cache_key(),
        create_video_request("a boat", request_id="k", num_frames=13).generate_cache_key(),
        create_video_request("a boat", request_id="k", num_frames=9, fps=8).generate_cache_key(),
    }
    assert len(keys) == 3


def test_an_image_request_keeps_its_digests() -> None:
    """The video fields at their defaults are left out of an image's fingerprint and
    cache key: digests of requests sent before video existed do not change."""
    request = create_diffusion_request("a boat", request_id="old", seed=5)
    parts = request.cache_key_parts()
    assert "num_frames" not in parts and "fps" not in parts
    assert "num_frames" not in request.model_dump(exclude_defaults=True)


def test_video_requests_run_on_the_video_models() -> None:
    config = get_config()
    assert dit_model(create_video_request("a"), config) == config.diffusion.video_model
    i2v = create_video_request("a", image=png_b64())
    assert dit_model(i2v, config) == config.diffusion.video_image_model
    named = create_video_request("a", model=config.diffusion.video_model)
    assert dit_model(named, config) == config.diffusion.video_model
    assert {config.diffusion.video_model, config.diffusion.video_image_model} <= set(
        config.diffusion_models()
    )


def test_a_video_for_an_image_family_is_refused_before_it_is_sent() -> None:
    config = replace(get_config(), models={"flux-x": ModelEntry(family="flux")})
    with pytest.raises(RequestValidationError, match="makes images") as err:
        check_model(create_video_request("a", model="flux-x"), config)
    assert err.value.field == "model"
    with pytest.raises(RequestValidationError) as err:
        check_model(create_video_request("a", model="nobody"), config)
    assert err.value.field == "model"
    wan = replace(config, models={"wan-x": ModelEntry(family="wan")})
    check_model(create_video_request("a", model="wan-x"), wan)
    check_model(create_diffusion_request("a", model="wan-x"), wan)  # one frame


def test_an_empty_video_model_is_a_config_error() -> None:
    config = get_config()
    broken = replace(config, diffusion=replace(config.diffusion, video_model=""))
    with pytest.raises(ConfigError) as err:
        broken.validate()
    assert err.value.field == "diffusion.video_model"
