"""Typed results: what a task returns, as dataclasses that serialize to its JSON.

Workers build them; `to_json()` gives the dict Celery stores (JSON only on the wire);
applications may read a result dict back with `from_json()`. Field order is the order
of the keys in the JSON.

`timings` holds at least `queued_s` (creation to start), `run_s` and `started_at`,
plus the engine's phases (`generate_s`; `encode_s`, `denoise_s`, `decode_s` for images).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

R = TypeVar("R", bound="_Result")


@dataclass
class Usage:
    """Token counts of an AR generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)


def _plain(value: Any) -> Any:
    """A copy of a JSON value (dicts and lists copied, a dataclass as its dict)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


class _Result:
    """JSON in and out for the result dataclasses below."""

    def to_json(self) -> dict[str, Any]:
        """A copy of the fields by name, a nested dataclass (`usage`) as its dict.
        (`dataclasses.asdict` would deep-copy every leaf value too, for a tenth of a
        probe request's worker time.)"""
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any]) -> R:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        values = {k: v for k, v in data.items() if k in names}
        if isinstance(values.get("usage"), dict):
            values["usage"] = Usage(**values["usage"])
        return cls(**values)


@dataclass
class ProbeResult(_Result):
    """A probe request's answer: it ran no engine (the queue path alone is measured)."""

    request_id: str
    text: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class TextResult(_Result):
    """A TEXT request's generation."""

    request_id: str
    request_type: str
    text: str
    usage: Usage
    finish_reason: str  # "length" | "stop"
    engine: str
    model: str = ""  # the model that wrote it (the AR pool's `ar.model`)
    timings: dict[str, float] = field(default_factory=dict)
    lora: list[dict[str, Any]] = field(default_factory=list)  # see ImageResult
    #: Every completion ({index, text, finish_reason, completion_tokens, logprobs}) when
    #: the request asked for `n` > 1 or for logprobs; empty otherwise (`text` is all).
    choices: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PromptResult(_Result):
    """The AR stage of a MULTIMODAL request: the image prompt it wrote (task `<id>.prompt`)."""

    request_id: str
    text: str
    image_prompt: str
    usage: Usage
    finish_reason: str
    engine: str
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ImageResult(_Result):
    """A DIFFUSION or IMAGE request's picture: a PNG under the workers' `output_dir`.

    `steps_run` counts the denoising steps whose transformer blocks ran (fewer than
    `steps` with step caching, 0 on a DiT cache hit); `cache` says what was reused.
    `denoise_steps`: the scheduler steps this request ran, each once (`steps`, or fewer
    for img2img; 0 when reused); `preemptions`: how often the worker's step scheduler
    paused it for a higher-ranked request (`timings.paused_s` in all); `max_batch`: the
    most requests any of its steps ran together with (itself included). `lora`: the
    adapters it ran with, each `{name, scale, hit, load_s}`: `hit` true when the adapter
    was loaded already, false when it was loaded for this request (in `load_s` seconds),
    null when no adapter ran (the image came from the DiT cache or another worker).
    `model` is the registry name of the model that ran it (the request's `model`, or
    the pool's default).
    """

    request_id: str
    request_type: str
    image_path: str
    width: int
    height: int
    seed: int
    steps: int
    steps_run: int
    step_cache: str
    cache: dict[str, str]
    engine: str
    model: str = ""  # the diffusion model that ran it (its worker's `diffusion.model`)
    timings: dict[str, float] = field(default_factory=dict)
    denoise_steps: int = 0
    preemptions: int = 0
    max_batch: int = 0
    lora: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class VideoResult(_Result):
    """A VIDEO request's video: an MP4 (H.264, yuv420p) under the workers' `output_dir`,
    with its first frame as a PNG thumbnail and a JPEG spritesheet of frames spread
    over it.

    `num_frames` at `fps` last `duration_s`. `cache`, `steps_run`, `denoise_steps`,
    `preemptions`, `max_batch`, `lora` and `model` mean what they mean for an image
    (`ImageResult`): an exact repeat returns the stored MP4 (`cache.latents` "hit").
    """

    request_id: str
    request_type: str
    video_path: str
    thumbnail_path: str
    spritesheet_path: str
    num_frames: int
    fps: int
    duration_s: float
    width: int
    height: int
    seed: int
    steps: int
    steps_run: int
    cache: dict[str, str]
    engine: str
    model: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    denoise_steps: int = 0
    preemptions: int = 0
    max_batch: int = 0
    lora: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class MultimodalResult(ImageResult):
    """A MULTIMODAL request: the picture, the prompt the AR stage wrote, and per-stage
    timings (`stages`: `ar` and `dit`, each with `queued_s` and `run_s`)."""

    text: str = ""
    image_prompt: str | None = None
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    stages: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class SpeechResult(_Result):
    """A SPEECH request's audio: a file in `format` under the workers' `output_dir`.

    `duration_s` of sound at `sample_rate`, spoken by `voice` (the speaker id it ran
    with: `speaker`). `chunks`: the pieces the engine made it in, each written to the
    request's stream as it came (`omni_tasks.stream_audio`, the HTTP API);
    `timings.first_chunk_s` is the time from the start of the run to the first one.
    `input_chars` counts the characters spoken (OpenAI's usage for TTS).
    """

    request_id: str
    request_type: str
    audio_path: str
    format: str
    sample_rate: int
    duration_s: float
    model: str
    voice: str
    speaker: int
    engine: str
    chunks: int = 1
    input_chars: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    max_batch: int = 0


@dataclass
class AudioResult(_Result):
    """An AUDIO request's sound: a file in `format` under the workers' `output_dir`,
    `channels` channels at `sample_rate`, `duration_s` long. `cache`, `steps_run`,
    `denoise_steps`, `preemptions`, `max_batch`, `lora` and `model` mean what they mean
    for an image (`ImageResult`): an exact repeat returns the stored file's bytes.
    """

    request_id: str
    request_type: str
    audio_path: str
    format: str
    sample_rate: int
    duration_s: float
    channels: int
    seed: int
    steps: int
    steps_run: int
    cache: dict[str, str]
    engine: str
    model: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    denoise_steps: int = 0
    preemptions: int = 0
    max_batch: int = 0
    lora: list[dict[str, Any]] = field(default_factory=list)
