"""Requests: validation names the field and nothing reaches Redis; cache keys."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest

from omni_tasks import (
    OmniRequest,
    ProcessingStage,
    RequestType,
    RequestValidationError,
    create_diffusion_request,
    create_image_request,
    create_multimodal_request,
    create_text_request,
    generate_image,
    generate_multimodal,
    generate_text,
)
from omni_tasks.requests import encode_image_file

PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
# A PNG whose header claims 50000x50000 pixels: 2.5 GP once decoded, 70 bytes sent.
PNG_BOMB = PNG_1PX[:16] + (50_000).to_bytes(4, "big") * 2 + PNG_1PX[24:]
# A JPEG frame header claiming 65535x65535 pixels.
JPEG_BOMB = b"\xff\xd8\xff\xc0\x00\x11\x08\xff\xff\xff\xff\x03" + b"\x00" * 12


def snapshot(client) -> dict[str, object]:
    return {k: client.type(k) for k in client.scan_iter(count=1000)}


BAD_TEXT = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 4001}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 100_000}, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "seed": -3}, "seed"),
    ({"prompt": "hi", "priority": "urgent"}, "priority"),
    ({"prompt": "hi", "timeout_s": 0}, "timeout_s"),
    ({"prompt": "hi", "colour": "red"}, "colour"),
    ({"max_tokens": 5}, "prompt"),
    # Strict types: no string or bool for a number, no number for a string.
    ({"prompt": "hi", "max_tokens": "16"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 16.0}, "max_tokens"),
    ({"prompt": "hi", "temperature": "0.5"}, "temperature"),
    ({"prompt": "hi", "top_p": False}, "top_p"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "hi", "stop": "END"}, "stop"),
    # Non-finite numbers.
    ({"prompt": "hi", "temperature": float("nan")}, "temperature"),
    ({"prompt": "hi", "timeout_s": float("inf")}, "timeout_s"),
    # Internal state is not the caller's to set.
    ({"prompt": "hi", "stage": 5}, "stage"),
    ({"prompt": "hi", "processing_stage": 5}, "processing_stage"),
    ({"prompt": "hi", "errors": ["forged"]}, "errors"),
    # An id is given whole or not at all: never silently replaced.
    ({"prompt": "hi", "request_id": ""}, "request_id"),
    ({"prompt": "hi", "request_id": "  "}, "request_id"),
    ({"prompt": "hi", "request_id": "a\nb"}, "request_id"),
    ({"prompt": "hi", "request_id": 7}, "request_id"),
]
BAD_IMAGE = [
    ({"prompt": "fox", "width": 72}, "width"),
    ({"prompt": "fox", "height": 8}, "height"),
    ({"prompt": "fox", "width": 4096}, "width"),
    ({"prompt": "fox", "steps": 0}, "steps"),
    ({"prompt": "fox", "steps": 1000}, "steps"),
    ({"prompt": "fox", "guidance": -1}, "guidance"),
    ({"prompt": "fox", "guidance": 99}, "guidance"),
    ({"prompt": "fox", "seed": 2**40}, "seed"),
    ({"prompt": "fox", "width": "64"}, "width"),
    ({"prompt": "fox", "steps": True}, "steps"),
    ({"prompt": "fox", "seed": 3.0}, "seed"),
    ({"prompt": "fox", "guidance": float("-inf")}, "guidance"),
    (
        {"prompt": "fox", "step_cache_params": {"threshold": float("nan")}},
        "step_cache_params.threshold",
    ),
    ({"prompt": "fox", "step_cache_params": {"threshold": "0.1"}}, "step_cache_params.threshold"),
    ({"prompt": "fox", "image": "no/such/file.png"}, "image"),
    ({"prompt": "fox", "image": __file__}, "image"),  # exists: refused all the same
    ({"prompt": "fox", "image": base64.b64encode(PNG_BOMB).decode()}, "image"),
    ({"prompt": "fox", "image": "bm90IGFuIGltYWdl"}, "image"),
    ({"prompt": "fox", "image": "@@@not base64@@@"}, "image"),
    ({"prompt": "fox", "image": base64.b64encode(PNG_1PX).decode(), "strength": 0}, "strength"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_TEXT)
def test_bad_text_fields_fail_before_enqueue(redis_client, fields, field) -> None:
    before = snapshot(redis_client)
    with pytest.raises(RequestValidationError) as info:
        generate_text.delay(**fields)
    assert info.value.field == field
    assert field in str(info.value)
    assert snapshot(redis_client) == before


@pytest.mark.parametrize(("fields", "field"), BAD_IMAGE)
def test_bad_image_fields_fail_before_enqueue(redis_client, fields, field) -> None:
    before = snapshot(redis_client)
    with pytest.raises(RequestValidationError) as info:
        generate_image.delay(**fields)
    assert info.value.field == field
    assert snapshot(redis_client) == before


def test_bad_multimodal_and_positional_args_fail_before_enqueue(redis_client) -> None:
    before = snapshot(redis_client)
    with pytest.raises(RequestValidationError) as info:
        generate_multimodal.delay(prompt="a cat", width=30)
    assert info.value.field == "width"
    with pytest.raises(RequestValidationError) as info:
        generate_text.delay("positional prompt")
    assert info.value.field == "args"
    with pytest.raises(RequestValidationError):
        generate_text.apply_async(kwargs={"prompt": "hi", "request_type": "diffusion"})
    assert snapshot(redis_client) == before


def test_factories_validate_and_fill_the_seed(tmp_path: Path) -> None:
    text = create_text_request(
        "Hello, world!",
        request_id="req_001",
        sampling_params={"max_tokens": 12, "temperature": 0.0},
    )
    assert (text.request_id, text.request_type, text.max_tokens) == (
        "req_001",
        RequestType.TEXT,
        12,
    )
    assert text.seed is None
    image = create_diffusion_request("a red fox", width=64, height=32)
    assert image.seed is not None and image.request_type is RequestType.DIFFUSION
    path = tmp_path / "in.png"
    path.write_bytes(PNG_1PX)
    edit = create_image_request("make it blue", image=encode_image_file(path))
    assert edit.request_type is RequestType.IMAGE
    assert base64.b64decode(edit.image) == PNG_1PX  # the caller's file, read by the caller
    multi = create_multimodal_request("a lighthouse")
    assert multi.request_type is RequestType.MULTIMODAL
    with pytest.raises(RequestValidationError) as info:
        create_diffusion_request("fox", image=encode_image_file(path))
    assert info.value.field == "image"


def test_an_input_image_is_accepted_in_each_inline_form() -> None:
    from PIL import Image

    encoded = base64.b64encode(PNG_1PX).decode()
    forms = [PNG_1PX, encoded, f"  {encoded}\n", f"data:image/png;base64,{encoded}"]
    assert {create_image_request("edit", image=form).image for form in forms} == {encoded}
    for fmt, options in (("JPEG", {}), ("WEBP", {}), ("WEBP", {"lossless": True})):
        buf = io.BytesIO()
        Image.new("RGB", (40, 24), "blue").save(buf, format=fmt, **options)
        request = create_image_request("edit", image=buf.getvalue())
        assert base64.b64decode(request.image) == buf.getvalue(), fmt


@pytest.mark.parametrize("as_path", [str, Path])
def test_an_image_path_is_refused_and_never_read(tmp_path: Path, as_path) -> None:
    """An existing file and a missing one get the same answer: nothing to probe."""
    real = tmp_path / "real.png"
    real.write_bytes(PNG_1PX)
    answers = set()
    for path in (real, tmp_path / "missing.png", Path("/etc/passwd")):
        with pytest.raises(RequestValidationError) as info:
            create_image_request("edit", image=as_path(path))
        assert info.value.field == "image"
        answers.add(str(info.value))
    (answer,) = answers
    assert "file paths are not accepted" in answer and "encode_image_file" in answer


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"GIF89a" + b"\x00" * 40, "not a PNG, JPEG or WebP"),
        (b"plain text, not an image", "not a PNG, JPEG or WebP"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "bad header"),
        (PNG_1PX[:12], "bad header"),
        (b"\xff\xd8\xff\xda" + b"\x00" * 8, "bad header"),  # a JPEG scan with no frame
        (PNG_BOMB, "decompression bomb"),
        (JPEG_BOMB, "65535x65535 pixels"),
        (PNG_1PX + b"\x00" * (16 * 1024 * 1024), "bytes; at most"),
    ],
)
def test_a_payload_that_is_not_a_usable_image_is_refused(payload: bytes, reason: str) -> None:
    for form in (payload, base64.b64encode(payload).decode()):
        with pytest.raises(RequestValidationError) as info:
            create_image_request("edit", image=form)
        assert info.value.field == "image" and reason in str(info.value)


def test_a_data_url_must_be_base64() -> None:
    with pytest.raises(RequestValidationError, match="data: URL must be base64") as info:
        create_image_request("edit", image="data:image/png,%89PNG")
    assert info.value.field == "image"


def test_message_round_trip_and_stage_and_errors() -> None:
    request = create_diffusion_request("fox", steps=6, seed=5, priority="high")
    again = OmniRequest.from_message(request.to_message())
    assert again == request
    request.update_processing_stage(ProcessingStage.DIT_GENERATION)
    assert (
        request.processing_stage is ProcessingStage.DIT_GENERATION
        and not request.processing_stage.is_finished()
    )
    request.update_processing_stage(ProcessingStage.COMPLETED)
    assert request.processing_stage.is_finished()
    request.add_error("boom")
    assert request.errors == ["boom"]
    assert ProcessingStage.WAITING < ProcessingStage.AR_GENERATION < ProcessingStage.COMPLETED


def test_cache_key_covers_what_determines_the_output() -> None:
    a = create_diffusion_request("fox", seed=1, steps=4)
    same = create_diffusion_request("fox", seed=1, steps=4, priority="low")
    assert a.generate_cache_key() == same.generate_cache_key()  # id/priority/time excluded
    for change in (
        {"seed": 2},
        {"steps": 5},
        {"width": 128},
        {"guidance": 1.0},
        {"negative_prompt": "blur"},
    ):
        other = create_diffusion_request("fox", **{"seed": 1, "steps": 4, **change})
        assert other.generate_cache_key() != a.generate_cache_key(), change
    assert (
        create_diffusion_request("cat", seed=1, steps=4).generate_cache_key()
        != a.generate_cache_key()
    )
    t1 = create_text_request("hi", max_tokens=5)
    assert t1.generate_cache_key() != create_text_request("hi", max_tokens=6).generate_cache_key()


def test_cost_estimate_orders_work() -> None:
    small = create_diffusion_request("fox", width=64, height=64, steps=4)
    big = create_diffusion_request("fox", width=512, height=512, steps=20)
    assert big.estimated_cost() > small.estimated_cost() > 0
    assert create_text_request("hi", max_tokens=1000).estimated_cost() == pytest.approx(1.0)


def test_png_from_pillow_is_accepted() -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    request = create_image_request("edit", image=base64.b64encode(buf.getvalue()).decode())
    assert request.image
