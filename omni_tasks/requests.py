"""Typed, validated requests: what an app sends and what a worker trusts.

An `OmniRequest` travels as a flat JSON object (the task's kwargs). The producer
validates it before anything is enqueued; the worker validates the same message again
and rejects what does not parse. Errors name the field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import time
import typing
import uuid
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from omni_tasks.errors import RequestValidationError

# Documented bounds (README "Requests").
MAX_PROMPT_CHARS = 4000
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 16, 2048, 16
MAX_STEPS = 100
MAX_TOKENS = 4096
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
MAX_IMAGE_BYTES = 16 * 1024 * 1024
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")  # PNG, JPEG, WebP

Priority = Literal["high", "normal", "low"]
#: A pipeline stage: "ar" runs on the AR pool, "dit" on the diffusion pool.
Stage = Literal["ar", "dit"]
STAGES: tuple[Stage, ...] = ("ar", "dit")
StepCacheMode = Literal["none", "taylorseer", "magcache", "first_block", "pab", "cache_dit"]
#: Step-level DiT acceleration modes a request may name (the diffusion pool implements each).
STEP_CACHE_MODES: tuple[str, ...] = typing.get_args(StepCacheMode)


class RequestType(Enum):
    TEXT = "text"
    IMAGE = "image"  # an input image: edit / img2img
    MULTIMODAL = "multimodal"  # AR stage writes the image prompt, DiT stage renders it
    DIFFUSION = "diffusion"  # text-to-image


class ProcessingStage(IntEnum):
    """The processing status of a request object in this process; ordered, so
    `status >= COMPLETED` means finished. Kept off the wire: the task's state in the
    result backend is what other processes see."""

    WAITING = 0
    PREPROCESSING = 1
    AR_GENERATION = 2
    DIT_GENERATION = 3
    POSTPROCESSING = 4
    COMPLETED = 5
    FAILED = 6
    CANCELLED = 7

    def is_finished(self) -> bool:
        return self >= ProcessingStage.COMPLETED


IMAGE_TYPES = (RequestType.DIFFUSION, RequestType.IMAGE, RequestType.MULTIMODAL)


def stages_of(request_type: RequestType) -> tuple[Stage, ...]:
    """The pipeline stages a request of this type passes through, in order."""
    if request_type is RequestType.TEXT:
        return ("ar",)
    if request_type is RequestType.MULTIMODAL:
        return ("ar", "dit")
    return ("dit",)


class OmniRequest(BaseModel):
    """One request of any `RequestType`; text fields and image fields side by side."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=128)
    request_type: RequestType
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    priority: Priority = "normal"
    model: str | None = Field(default=None, max_length=512)
    created_at: float = Field(default_factory=time.time, gt=0)
    timeout_s: float | None = Field(default=None, gt=0, le=86400)
    processing_stage: ProcessingStage = ProcessingStage.WAITING
    errors: list[str] = Field(default_factory=list)
    # Text (TEXT, and the AR stage of MULTIMODAL).
    max_tokens: int = Field(default=64, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=8)
    # Image (DIFFUSION, IMAGE, and the DiT stage of MULTIMODAL).
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    width: int = Field(default=64, ge=MIN_SIDE, le=MAX_SIDE)
    height: int = Field(default=64, ge=MIN_SIDE, le=MAX_SIDE)
    steps: int = Field(default=4, ge=1, le=MAX_STEPS)
    guidance: float = Field(default=3.5, ge=0.0, le=MAX_GUIDANCE)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    image: str | None = None  # base64 PNG/JPEG/WebP on the wire; a path is read at the producer
    strength: float = Field(default=0.6, gt=0.0, le=1.0)
    step_cache: StepCacheMode | None = None  # None: the pool's `diffusion.step_cache`
    step_cache_params: dict[str, float] | None = Field(default=None, max_length=8)

    @model_validator(mode="before")
    @classmethod
    def _drop_local_state(cls, data: Any) -> Any:
        """Earlier producers could send the in-process status as `stage`: ignore it."""
        if isinstance(data, dict) and "stage" in data:
            data = {k: v for k, v in data.items() if k != "stage"}
        return data

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, value: int) -> int:
        if value % SIDE_MULTIPLE:
            raise ValueError(f"must be a multiple of {SIDE_MULTIPLE}")
        return value

    @field_validator("image")
    @classmethod
    def _image_payload(cls, value: str | None) -> str | None:
        return None if value is None else _load_image_b64(value)

    @model_validator(mode="after")
    def _fields_fit_type(self) -> OmniRequest:
        if self.request_type is RequestType.IMAGE and self.image is None:
            raise ValueError("image: IMAGE requests need an input image (base64 or path)")
        if self.request_type is not RequestType.IMAGE and self.image is not None:
            raise ValueError("image: only IMAGE requests take an input image")
        return self

    # The request API schedulers and caches use.
    def generate_cache_key(self) -> str:
        """A digest of everything that determines the output (not id, priority, time)."""
        parts = self.cache_key_parts()
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def cache_key_parts(self) -> dict[str, Any]:
        parts: dict[str, Any] = {"type": self.request_type.value, "model": self.model}
        parts["prompt"] = self.prompt
        if self.request_type in (RequestType.TEXT, RequestType.MULTIMODAL):
            parts.update(
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                stop=self.stop,
            )
        if self.request_type in IMAGE_TYPES:
            parts.update(
                negative_prompt=self.negative_prompt,
                width=self.width,
                height=self.height,
                steps=self.steps,
                guidance=self.guidance,
            )
        if self.request_type is RequestType.IMAGE:
            parts["image"] = hashlib.sha256((self.image or "").encode()).hexdigest()
            parts["strength"] = self.strength
        if self.request_type in IMAGE_TYPES:
            parts.update(step_cache=self.step_cache, step_cache_params=self.step_cache_params)
        parts["seed"] = self.seed
        return parts

    def update_processing_stage(self, stage: ProcessingStage) -> None:
        self.processing_stage = stage

    def add_error(self, message: str) -> None:
        self.errors.append(message)

    def estimated_cost(self) -> float:
        """Relative work of the whole request: its AR cost plus its DiT cost."""
        cost = 0.0
        if self.request_type in (RequestType.TEXT, RequestType.MULTIMODAL):
            cost += self.ar_cost()
        if self.request_type in IMAGE_TYPES:
            cost += self.dit_cost()
        return cost

    def ar_cost(self) -> float:
        """Work of the AR stage, in kilo-tokens."""
        return self.max_tokens / 1000

    def dit_cost(self) -> float:
        """Work of the DiT stage, in megapixel-steps."""
        return self.steps * self.width * self.height / 1e6

    # Wire format.
    def to_message(self) -> dict[str, Any]:
        """The JSON-safe kwargs of the task (defaults omitted to keep messages small)."""
        data = self.model_dump(
            mode="json", exclude_defaults=True, exclude={"processing_stage", "errors"}
        )
        data["request_id"] = self.request_id
        data["request_type"] = self.request_type.value
        data["created_at"] = self.created_at
        return data

    @classmethod
    def from_message(cls, data: dict[str, Any]) -> OmniRequest:
        """Validate a message (producer or worker side) into a request, or raise."""
        if not isinstance(data, dict):
            raise RequestValidationError("request", f"must be a JSON object, got {type(data)}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _to_request_error(exc) from None


def _load_image_b64(value: str) -> str:
    """Accept base64 image bytes (optionally a data: URL) or a readable file path."""
    text = value.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    raw: bytes | None = None
    if len(text) < 4096 and not text.startswith(("iVBOR", "/9j/", "UklGR")):
        path = Path(text).expanduser()
        if path.is_file():
            raw = path.read_bytes()
        elif "/" in text or text.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
            raise ValueError(f"file {text!r} does not exist")
    if raw is None:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be base64 image data or a path to an image file") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise ValueError(f"is {len(raw)} bytes; at most {MAX_IMAGE_BYTES}")
    if not raw.startswith(IMAGE_MAGIC):
        raise ValueError("is not a PNG, JPEG or WebP image")
    return base64.b64encode(raw).decode("ascii")


def _to_request_error(exc: ValidationError) -> RequestValidationError:
    errors = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if not loc and message.partition(":")[0].isidentifier():
            loc, _, message = message.partition(": ")
        errors.append({"field": loc or "request", "message": message})
    first = errors[0]
    return RequestValidationError(first["field"], first["message"], errors)


def _new_request(
    request_type: RequestType, prompt: str, request_id: str | None = None, **fields: Any
) -> OmniRequest:
    data = {"request_type": request_type, "prompt": prompt, **fields}
    if request_id:
        data["request_id"] = request_id
    if request_type in IMAGE_TYPES and data.get("seed") is None:
        data["seed"] = secrets.randbelow(MAX_SEED + 1)  # fixed at the producer: reproducible
    return OmniRequest.from_message(data)


def create_text_request(prompt: str, request_id: str | None = None, **fields: Any) -> OmniRequest:
    """A TEXT request; `sampling_params` may be a dict or any object with those attributes
    (vLLM's `SamplingParams`, say)."""
    sampling = fields.pop("sampling_params", None)
    if sampling is not None:
        fields = {**_sampling_fields(sampling), **fields}
    return _new_request(RequestType.TEXT, prompt, request_id, **fields)


def create_diffusion_request(
    prompt: str, request_id: str | None = None, **fields: Any
) -> OmniRequest:
    return _new_request(RequestType.DIFFUSION, prompt, request_id, **fields)


def create_image_request(
    prompt: str, image: str | Path, request_id: str | None = None, **fields: Any
) -> OmniRequest:
    """An IMAGE request (img2img / edit) from base64 image data or a path."""
    return _new_request(RequestType.IMAGE, prompt, request_id, image=str(image), **fields)


def create_multimodal_request(
    prompt: str, request_id: str | None = None, **fields: Any
) -> OmniRequest:
    return _new_request(RequestType.MULTIMODAL, prompt, request_id, **fields)


def request_from_task_kwargs(request_type: RequestType, kwargs: dict[str, Any]) -> OmniRequest:
    """Validate the kwargs of `generate_*.delay(...)` into a request of that type."""
    kind = kwargs.get("request_type", request_type.value)
    if kind != request_type.value and kind != request_type:
        raise RequestValidationError("request_type", f"this task takes {request_type.value}")
    fields = {k: v for k, v in kwargs.items() if k != "request_type"}
    if "prompt" not in fields:
        raise RequestValidationError("prompt", "field required")
    return _new_request(request_type, fields.pop("prompt"), **fields)


def _sampling_fields(sampling: Any) -> dict[str, Any]:
    names = ("max_tokens", "temperature", "top_p", "seed", "stop")
    if isinstance(sampling, dict):
        return {k: sampling[k] for k in names if k in sampling}
    found = {k: getattr(sampling, k, None) for k in names}
    return {k: v for k, v in found.items() if v is not None}
