"""`true_cfg_scale` on the request: checked where every field is, carried on the wire,
part of the DiT cache key when set, and invisible in the digests of requests that leave
it out (their cache keys and fingerprints are what they were before the field)."""

from __future__ import annotations

import hashlib
import json

import pytest

from omni_tasks.errors import RequestValidationError
from omni_tasks.requests import OmniRequest, create_diffusion_request, create_text_request


def test_true_cfg_scale_needs_a_negative_prompt_and_a_scale_from_1() -> None:
    with pytest.raises(RequestValidationError) as caught:
        create_diffusion_request("a lake", true_cfg_scale=4.0)
    assert caught.value.field == "true_cfg_scale" and "negative_prompt" in caught.value.message
    for bad in (0.5, 31.0, "4", float("nan")):
        with pytest.raises(RequestValidationError) as caught:
            create_diffusion_request("a lake", negative_prompt="blur", true_cfg_scale=bad)
        assert caught.value.field == "true_cfg_scale", bad
    off = create_diffusion_request("a lake", negative_prompt="blur", true_cfg_scale=1.0)
    assert off.true_cfg_scale == 1.0


def test_it_travels_in_the_message_and_keys_the_cache() -> None:
    plain = create_diffusion_request("a lake", negative_prompt="blur", seed=3)
    strong = create_diffusion_request("a lake", negative_prompt="blur", seed=3, true_cfg_scale=6)
    message = strong.to_message()
    assert message["true_cfg_scale"] == 6.0
    assert OmniRequest.from_message(message).true_cfg_scale == 6.0
    assert "true_cfg_scale" not in plain.to_message()
    assert strong.generate_cache_key() != plain.generate_cache_key()
    assert strong.fingerprint() != plain.fingerprint()


@pytest.mark.parametrize(
    "request_",
    [
        create_diffusion_request("a lake", negative_prompt="blur", seed=3),
        create_text_request("hello"),
    ],
)
def test_requests_without_it_keep_their_digests(request_: OmniRequest) -> None:
    """Neither true CFG nor the later text fields (chat messages, `n`, penalties,
    logprobs, `stream`) nor the video, speech and audio fields change the digests of
    requests that do not use them."""
    assert "true_cfg_scale" not in request_.cache_key_parts()
    later = {"messages", "n", "presence_penalty", "frequency_penalty", "logprobs"}
    later |= {"top_logprobs", "stream", "num_frames", "fps"}
    later |= {"input", "voice", "speed", "response_format", "sample_rate", "seconds"}
    assert not later & set(request_.cache_key_parts())
    before = request_.model_dump(
        mode="json", exclude={"request_id", "created_at", "true_cfg_scale", *later}
    )
    digest = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert request_.fingerprint() == digest
