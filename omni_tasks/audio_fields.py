"""The fields of speech and text-to-audio requests (`RequestType.SPEECH`, `AUDIO`).

A speech request speaks its `input` (at most `MAX_SPEECH_CHARS`, OpenAI's limit) in a
`voice`, at `speed` (OpenAI's 0.25 to 4). Both kinds give an audio file in one of
`AUDIO_FORMATS` at `sample_rate` (None: the model's own rate). A text-to-audio request
makes `seconds` of sound (`DEFAULT_AUDIO_SECONDS` when it gives none: the request then
carries the number, so the same sound asked both ways is the same request), at
Stable Audio's guidance (`DEFAULT_AUDIO_GUIDANCE`) unless it gives one.
"""

from __future__ import annotations

from typing import Any

AUDIO_FORMATS = ("wav", "flac", "mp3", "opus", "pcm")
#: Each format's media type (Opus in Ogg, as OpenAI returns it; pcm: raw s16le).
MEDIA_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "pcm": "audio/pcm",
}
MAX_SPEECH_CHARS = 4096
MIN_SPEED, MAX_SPEED = 0.25, 4.0
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 48000
DEFAULT_AUDIO_SECONDS = 2.0
#: Stable Audio's own default guidance (an image's is 3.5).
DEFAULT_AUDIO_GUIDANCE = 7.0
#: Stable Audio Open's longest clip.
MAX_AUDIO_SECONDS = 47.0
AUDIO = "audio"


def is_audio(data: dict[str, Any]) -> bool:
    """Whether raw request fields are a text-to-audio request's."""
    kind = data.get("request_type")
    return getattr(kind, "value", kind) == AUDIO


def audio_aliases(data: dict[str, Any]) -> dict[str, Any]:
    """A text-to-audio request's raw fields with its defaults filled in (a copy where
    they change): its length, and Stable Audio's guidance."""
    if not is_audio(data):
        return data
    filled = dict(data)
    if filled.get("seconds") is None:
        filled["seconds"] = DEFAULT_AUDIO_SECONDS
    if "guidance" not in filled and "guidance_scale" not in filled:
        filled["guidance"] = DEFAULT_AUDIO_GUIDANCE
    return filled
