"""Typed, validated requests: what an app sends and what a worker trusts.

An `OmniRequest` travels as a flat JSON object (the task's kwargs). The producer
validates it before anything is enqueued; the worker validates the same message again
and rejects what does not parse. Errors name the field.

The models check shape and ranges only. The names a config registers (LoRA adapters) are
checked against the `Registries` an entry point passes as pydantic's validation context:
a task's send passes its app's (`request_from_task_kwargs`), and `create_*_request`
the ones it is given; without them (`OmniRequest.from_message` too) a name's shape is
checked, and the send checks the name against the registries of the app it goes to.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from enum import IntEnum
from pathlib import PurePath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from omni_tasks.audio_fields import (
    MAX_AUDIO_SECONDS,
    MAX_SAMPLE_RATE,
    MAX_SPEECH_CHARS,
    MAX_SPEED,
    MIN_SAMPLE_RATE,
    MIN_SPEED,
    audio_aliases,
)
from omni_tasks.config import Registries
from omni_tasks.errors import RequestValidationError
from omni_tasks.image_input import PATH_REFUSED, inline_image_b64
from omni_tasks.image_input import encode_image_file as encode_image_file  # re-exported
from omni_tasks.lora import MAX_ADAPTERS, AdapterSet, LoraRef, adapter_set, check_unique
from omni_tasks.video_fields import DEFAULT_FPS, MAX_FPS, MAX_FRAMES, frames_problem, video_aliases
from omni_tasks.vocabulary import STAGES as STAGES  # re-exported
from omni_tasks.vocabulary import STEP_CACHE_MODES as STEP_CACHE_MODES  # re-exported
from omni_tasks.vocabulary import PriorityClass
from omni_tasks.vocabulary import RequestType as RequestType  # re-exported
from omni_tasks.vocabulary import Stage as Stage  # re-exported
from omni_tasks.vocabulary import StepCacheMode as StepCacheMode  # re-exported

# Documented bounds (docs/python.md, "Requests and validation").
MAX_PROMPT_CHARS = 4000
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 16, 2048, 16
MAX_STEPS = 100
MAX_TOKENS = 4096
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
MAX_PARTIAL_IMAGES = 3
MAX_MESSAGES = 256
#: Characters of all the messages of a chat request together.
MAX_CHAT_CHARS = 32000
MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20
#: A second of sound weighs, in the schedulers' cost, this many megapixels of image: about
#: a 160x160 picture (Stable Audio's latents: 64 channels at ~21.5 frames a second).
AUDIO_SECOND_MEGAPIXELS = 0.025
#: In-process state of a request object, never taken from a caller or a message.
INTERNAL_FIELDS = ("processing_stage", "errors", "stage")
# Strict types: a string or a bool is never taken for a number, nor a number for a
# string; floats must be finite (JSON has no NaN, and a worker must not see one).
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Str = Annotated[str, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]

#: A request's priority class (`vocabulary.PriorityClass`).
Priority = PriorityClass
AudioFormat = Literal["wav", "flac", "mp3", "opus", "pcm"]


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
#: The types a diffusion model renders (their DiT stage): images, videos and sounds.
DIT_TYPES = (*IMAGE_TYPES, RequestType.VIDEO, RequestType.AUDIO)
#: The types whose seed the producer fixes when none is given (their output samples
#: noise). Not SPEECH: a seeded speech request runs alone, an unseeded one batches
#: (`workers.engines.speech_engine`).
SEEDED_TYPES = DIT_TYPES
#: The types whose result is an audio file (`response_format`, `sample_rate`).
AUDIO_TYPES = (RequestType.SPEECH, RequestType.AUDIO)
#: The types that may stream their output while it is made (`stream`).
STREAM_TYPES = (RequestType.TEXT, RequestType.CHAT, RequestType.SPEECH)
#: The types that take an input image: an edit / img2img, or a video's first frame.
INPUT_IMAGE_TYPES = (RequestType.IMAGE, RequestType.VIDEO)
#: The types an AR engine generates text for (a MULTIMODAL request: its image prompt).
AR_TYPES = (RequestType.TEXT, RequestType.CHAT, RequestType.MULTIMODAL)
#: The types whose result is the text itself: the sampling extras (`n`, penalties,
#: `logprobs`) and streaming apply to them alone.
COMPLETION_TYPES = (RequestType.TEXT, RequestType.CHAT)
#: Text-only fields and the value that means "not used".
COMPLETION_FIELDS: dict[str, Any] = {
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logprobs": False,
    "top_logprobs": 0,
    "stream": False,
}
#: Fields that change how a result is delivered, not what it is: never digested.
DELIVERY_FIELDS = ("stream",)
#: Optional fields left out of a request's fingerprint while at their default (given):
#: a request that does not use them has one digest whichever fields exist.
UNSET_UNDIGESTED: dict[str, Any] = {
    "prompt": None,
    "messages": None,
    "true_cfg_scale": None,
    "num_frames": None,
    "fps": DEFAULT_FPS,
    "input": None,
    "voice": None,
    "speed": 1.0,
    "response_format": "wav",
    "sample_rate": None,
    "seconds": None,
    **{k: v for k, v in COMPLETION_FIELDS.items() if k not in DELIVERY_FIELDS},
}


def stages_of(request_type: RequestType) -> tuple[Stage, ...]:
    """The pipeline stages a request of this type passes through, in order."""
    if request_type in COMPLETION_TYPES:
        return ("ar",)
    if request_type is RequestType.MULTIMODAL:
        return ("ar", "dit")
    if request_type is RequestType.SPEECH:
        return ("tts",)
    return ("dit",)


class ChatMessage(BaseModel):
    """One message of a chat request, as OpenAI's chat API takes it (text content)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Str = Field(max_length=MAX_CHAT_CHARS)
    name: Str | None = Field(default=None, min_length=1, max_length=64)


class OmniRequest(BaseModel):
    """One request of any `RequestType`; text fields and image fields side by side."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    request_id: Str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=128)
    request_type: RequestType
    # Every type but CHAT and SPEECH takes a prompt; CHAT takes `messages`, SPEECH `input`.
    prompt: Str | None = Field(default=None, min_length=1, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    priority: Priority = "normal"
    model: Str | None = Field(default=None, max_length=512)
    created_at: Float = Field(default_factory=time.time, gt=0)
    timeout_s: Float | None = Field(default=None, gt=0, le=86400)
    # LoRA adapters from the config's registry (`omni_tasks.lora`); every request type.
    lora: list[LoraRef] = Field(default_factory=list, max_length=MAX_ADAPTERS)
    # In-process state (`processing_stage`, `errors`): private, so never from input.
    _processing_stage: ProcessingStage = PrivateAttr(default=ProcessingStage.WAITING)
    _errors: list[str] = PrivateAttr(default_factory=list)
    # Text (TEXT, and the AR stage of MULTIMODAL).
    max_tokens: Int = Field(default=64, ge=1, le=MAX_TOKENS)
    temperature: Float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[Str] = Field(default_factory=list, max_length=8)
    # TEXT and CHAT only (`COMPLETION_FIELDS`), as vLLM's sampling takes them.
    n: Int = Field(default=1, ge=1, le=MAX_CHOICES)
    presence_penalty: Float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: Float = Field(default=0.0, ge=-2.0, le=2.0)
    logprobs: Bool = False
    top_logprobs: Int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    # Publish the text while it is generated (`omni_tasks.stream_text`, SSE).
    stream: Bool = False
    # Image (DIFFUSION, IMAGE, and the DiT stage of MULTIMODAL).
    negative_prompt: Str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    width: Int = Field(default=64, ge=MIN_SIDE, le=MAX_SIDE)
    height: Int = Field(default=64, ge=MIN_SIDE, le=MAX_SIDE)
    steps: Int = Field(default=4, ge=1, le=MAX_STEPS)
    guidance: Float = Field(default=3.5, ge=0.0, le=MAX_GUIDANCE)
    # True classifier-free guidance: the transformer also runs on the negative prompt and
    # the two predictions are mixed by this scale (1 turns it off). None: the pool's.
    true_cfg_scale: Float | None = Field(default=None, ge=1.0, le=MAX_GUIDANCE)
    seed: Int | None = Field(default=None, ge=0, le=MAX_SEED)
    image: Str | None = None  # inline base64 PNG/JPEG/WebP; never a path (image_input)
    strength: Float = Field(default=0.6, gt=0.0, le=1.0)
    step_cache: StepCacheMode | None = None  # None: the pool's `diffusion.step_cache`
    step_cache_params: dict[Str, Float] | None = Field(default=None, max_length=8)
    # Previews decoded from intermediate latents, published while it runs (HTTP API
    # `partial_images`); not part of the output, so not of the cache key.
    partial_images: Int = Field(default=0, ge=0, le=MAX_PARTIAL_IMAGES)
    # Video (VIDEO only; `video_fields`: `seconds` becomes `num_frames`, 4k+1 frames).
    num_frames: Int | None = Field(default=None, ge=1, le=MAX_FRAMES)
    fps: Int = Field(default=DEFAULT_FPS, ge=1, le=MAX_FPS)
    # Speech (SPEECH only, OpenAI's names): the text to speak, the voice (a name of the
    # config's `speech.voices`, or a speaker id such as "2"), and the speaking rate.
    input: Str | None = Field(default=None, min_length=1, max_length=MAX_SPEECH_CHARS)
    voice: Str | None = Field(default=None, min_length=1, max_length=64)
    speed: Float = Field(default=1.0, ge=MIN_SPEED, le=MAX_SPEED)
    # Audio (SPEECH and AUDIO): the file's format, and its rate (None: the model's own).
    response_format: AudioFormat = "wav"
    sample_rate: Int | None = Field(default=None, ge=MIN_SAMPLE_RATE, le=MAX_SAMPLE_RATE)
    # Text-to-audio (AUDIO only): the sound's length (`audio_fields.DEFAULT_AUDIO_SECONDS`).
    seconds: Float | None = Field(default=None, gt=0, le=MAX_AUDIO_SECONDS)

    @model_validator(mode="before")
    @classmethod
    def _refuse_internal_fields(cls, data: Any) -> Any:
        """The processing status and errors are this process's own: a caller setting
        them (or the older `stage`) would forge a request's state."""
        if isinstance(data, dict):
            for name in INTERNAL_FIELDS:
                if name in data:
                    raise ValueError(f"{name}: is internal and cannot be set")
        return data

    @model_validator(mode="before")
    @classmethod
    def _video_fields(cls, data: Any) -> Any:
        """A video's `seconds` become `num_frames`, `guidance_scale` is `guidance`
        (`video_fields`); a sound's `seconds` get their default (`audio_fields`)."""
        if not isinstance(data, dict):
            return data
        return video_aliases(audio_aliases(data))

    @field_validator("request_id")
    @classmethod
    def _request_id_printable(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("must not contain control characters")
        return value

    @field_validator("prompt", "input")
    @classmethod
    def _prompt_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("messages")
    @classmethod
    def _messages_bounded(cls, value: list[ChatMessage] | None) -> list[ChatMessage] | None:
        if value is not None and sum(len(m.content) for m in value) > MAX_CHAT_CHARS:
            raise ValueError(f"must hold at most {MAX_CHAT_CHARS} characters in all")
        return value

    @field_validator("lora", mode="before")
    @classmethod
    def _one_adapter(cls, value: Any) -> Any:
        """One adapter may be given alone (a name or a {name, scale} object)."""
        return [value] if isinstance(value, (str, dict)) else value

    @field_validator("lora")
    @classmethod
    def _adapters_unique(cls, value: list[LoraRef]) -> list[LoraRef]:
        check_unique(value)
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, value: int) -> int:
        if value % SIDE_MULTIPLE:
            raise ValueError(f"must be a multiple of {SIDE_MULTIPLE}")
        return value

    @field_validator("image", mode="before")
    @classmethod
    def _image_inline(cls, value: Any) -> Any:
        """Raw bytes from a Python caller become base64; a path is refused, never read."""
        if isinstance(value, PurePath):
            raise ValueError(PATH_REFUSED)
        if isinstance(value, (bytes, bytearray)):
            return inline_image_b64(bytes(value))
        return value

    @field_validator("image")
    @classmethod
    def _image_payload(cls, value: str | None) -> str | None:
        return None if value is None else inline_image_b64(value)

    @model_validator(mode="after")
    def _input_fits_type(self) -> OmniRequest:
        """CHAT takes `messages`, SPEECH `input`, every other type a prompt; the text
        extras only the types whose result is the text."""
        wanted = {RequestType.CHAT: "messages", RequestType.SPEECH: "input"}
        needed = wanted.get(self.request_type, "prompt")
        if getattr(self, needed) is None:
            raise ValueError(f"{needed}: field required")
        for name in ("prompt", "messages", "input"):
            if name != needed and getattr(self, name) is not None:
                raise ValueError(f"{name}: a {self.request_type.value} request takes {needed}")
        if self.request_type not in COMPLETION_TYPES:
            for name, unused in COMPLETION_FIELDS.items():
                if name == "stream" and self.request_type in STREAM_TYPES:
                    continue
                if getattr(self, name) != unused:
                    raise ValueError(f"{name}: only text and chat requests take it")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _audio_fields_fit_type(self) -> OmniRequest:
        """The speech fields go with SPEECH, the audio file's with SPEECH and AUDIO."""
        speech = self.request_type is RequestType.SPEECH
        for name in ("voice", "speed"):
            if not speech and getattr(self, name) != UNSET_UNDIGESTED[name]:
                raise ValueError(f"{name}: only speech requests take it")
        if self.request_type not in AUDIO_TYPES:
            for name in ("response_format", "sample_rate"):
                if getattr(self, name) != UNSET_UNDIGESTED[name]:
                    raise ValueError(f"{name}: only speech and audio requests take it")
        elif self.lora:
            raise ValueError("lora: speech and audio models take no adapters")
        return self

    @model_validator(mode="after")
    def _fields_fit_type(self) -> OmniRequest:
        if self.request_type is RequestType.IMAGE and self.image is None:
            raise ValueError("image: IMAGE requests need an input image (inline, base64)")
        if self.request_type not in INPUT_IMAGE_TYPES and self.image is not None:
            raise ValueError("image: only image and video requests take an input image")
        video = self.request_type is RequestType.VIDEO
        if not video and (self.num_frames is not None or self.fps != DEFAULT_FPS):
            name = "num_frames" if self.num_frames is not None else "fps"
            raise ValueError(f"{name}: only video requests take it")
        if video and self.num_frames is not None and frames_problem(self.num_frames):
            raise ValueError(f"num_frames: {frames_problem(self.num_frames)}")
        if self.true_cfg_scale is not None and not self.negative_prompt:
            raise ValueError(
                "true_cfg_scale: needs a negative_prompt (true CFG guides away from it)"
            )
        return self

    # The request API schedulers and caches use.
    def generate_cache_key(self) -> str:
        """A digest of everything that determines the output (not id, priority, time)."""
        parts = self.cache_key_parts()
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def cache_key_parts(self) -> dict[str, Any]:
        parts: dict[str, Any] = {"type": self.request_type.value, "model": self.model}
        parts["prompt"] = self.prompt
        if self.messages is not None:
            parts["messages"] = [m.model_dump(exclude_none=True) for m in self.messages]
        if self.request_type in AR_TYPES:
            parts.update(
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                stop=self.stop,
            )
            for name, unused in COMPLETION_FIELDS.items():
                if name not in DELIVERY_FIELDS and getattr(self, name) != unused:
                    parts[name] = getattr(self, name)
        if self.request_type in DIT_TYPES:
            parts.update(
                negative_prompt=self.negative_prompt,
                width=self.width,
                height=self.height,
                steps=self.steps,
                guidance=self.guidance,
            )
            if self.true_cfg_scale is not None:
                parts["true_cfg_scale"] = self.true_cfg_scale
        if self.request_type is RequestType.IMAGE:
            parts["image"] = hashlib.sha256((self.image or "").encode()).hexdigest()
            parts["strength"] = self.strength
        if self.request_type is RequestType.VIDEO:
            parts.update(num_frames=self.num_frames, fps=self.fps)
            if self.image is not None:
                parts["image"] = hashlib.sha256(self.image.encode()).hexdigest()
        if self.request_type is RequestType.SPEECH:
            parts.update(input=self.input, voice=self.voice, speed=self.speed)
        if self.request_type is RequestType.AUDIO:
            parts["seconds"] = self.seconds
        if self.request_type in AUDIO_TYPES:
            parts.update(response_format=self.response_format, sample_rate=self.sample_rate)
        if self.request_type in DIT_TYPES:
            parts.update(step_cache=self.step_cache, step_cache_params=self.step_cache_params)
        parts["seed"] = self.seed
        if self.lora:  # absent without adapters: base-model keys stay as they were
            parts["lora"] = [list(pair) for pair in self.adapters]
        return parts

    def fingerprint(self) -> str:
        """A digest of the request without its id and creation time. The same id with
        the same fingerprint is an idempotent repeat; with another one, a conflict
        (`coordination.idempotency`)."""
        unset = {name for name, dflt in UNSET_UNDIGESTED.items() if getattr(self, name) == dflt}
        left_out = {"request_id", "created_at", *DELIVERY_FIELDS, *unset}
        data = self.model_dump(mode="json", exclude=left_out)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    @property
    def adapters(self) -> AdapterSet:
        """The canonical adapter set: (name, scale) pairs sorted by name."""
        return adapter_set(self.lora)

    @property
    def processing_stage(self) -> ProcessingStage:
        return self._processing_stage

    @property
    def errors(self) -> list[str]:
        return self._errors

    def update_processing_stage(self, stage: ProcessingStage) -> None:
        self._processing_stage = ProcessingStage(stage)

    def add_error(self, message: str) -> None:
        self._errors.append(message)

    def estimated_cost(self) -> float:
        """Relative work of the whole request: its AR cost plus its DiT cost."""
        cost = 0.0
        if self.request_type in AR_TYPES:
            cost += self.ar_cost()
        if self.request_type in DIT_TYPES:
            cost += self.dit_cost()
        if self.request_type is RequestType.SPEECH:
            cost += self.tts_cost()
        return cost

    def tts_cost(self) -> float:
        """Work of a speech request, in kilo-characters of its input."""
        return len(self.input or "") / 1000

    def ar_cost(self) -> float:
        """Work of the AR stage, in kilo-tokens."""
        return self.max_tokens / 1000

    def dit_cost(self) -> float:
        """Work of the DiT stage, in megapixel-steps (a video's pixels: all its frames';
        a sound's second counts as `AUDIO_SECOND_MEGAPIXELS`)."""
        if self.request_type is RequestType.AUDIO:
            return self.steps * (self.seconds or 0.0) * AUDIO_SECOND_MEGAPIXELS
        return self.steps * self.width * self.height * (self.num_frames or 1) / 1e6

    # Wire format.
    def to_message(self) -> dict[str, Any]:
        """The JSON-safe kwargs of the task (defaults omitted to keep messages small)."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        data["request_id"] = self.request_id
        data["request_type"] = self.request_type.value
        data["created_at"] = self.created_at
        return data

    @classmethod
    def from_message(
        cls, data: dict[str, Any], registries: Registries | None = None
    ) -> OmniRequest:
        """Validate a message (producer or worker side) into a request, or raise. With
        `registries` the names it uses are checked against them; without, its shape."""
        if not isinstance(data, dict):
            raise RequestValidationError("request", f"must be a JSON object, got {type(data)}")
        context = registries.context() if registries is not None else None
        try:
            return cls.model_validate(data, context=context)
        except ValidationError as exc:
            raise _to_request_error(exc) from None


def _to_request_error(exc: ValidationError) -> RequestValidationError:
    errors = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"].endswith("_type"):  # strict types: say what came instead
            message += f", got {type(err['input']).__name__}"
        if not loc and message.partition(":")[0].isidentifier():
            loc, _, message = message.partition(": ")
        errors.append({"field": loc or "request", "message": message})
    first = errors[0]
    return RequestValidationError(first["field"], first["message"], errors)


def _new_request(
    request_type: RequestType,
    prompt: str | None,
    request_id: str | None,
    registries: Registries | None,
    fields: dict[str, Any],
) -> OmniRequest:
    """A request of `request_type`, its names checked against `registries` where given,
    else for their shape (a send checks them against its app's). Anything but a
    `Registries` (a JSON body's "registries", say) is a field, refused as unknown."""
    if registries is not None and not isinstance(registries, Registries):
        fields, registries = {**fields, "registries": registries}, None
    data = {"request_type": request_type, **fields}
    if prompt is not None:
        data["prompt"] = prompt
    if request_id is not None:  # an empty id is refused, never silently replaced
        data["request_id"] = request_id
    if request_type in SEEDED_TYPES and data.get("seed") is None:
        # Fixed at the producer (reproducible), from the request id: a new id gets a new
        # seed, and the same request sent again under its id is the same request.
        data["seed"] = seed_of(data.setdefault("request_id", uuid.uuid4().hex))
    return OmniRequest.from_message(data, registries)


def seed_of(request_id: Any) -> int:
    """The seed of an image request sent without one: 0..MAX_SEED, from its id."""
    digest = hashlib.sha256(str(request_id).encode()).digest()
    return int.from_bytes(digest[:4], "big") % (MAX_SEED + 1)


def create_text_request(
    prompt: str,
    request_id: str | None = None,
    *,
    registries: Registries | None = None,
    **fields: Any,
) -> OmniRequest:
    """A TEXT request; `sampling_params` may be a dict or any object with those attributes
    (vLLM's `SamplingParams`, say)."""
    sampling = fields.pop("sampling_params", None)
    if sampling is not None:
        fields = {**_sampling_fields(sampling), **fields}
    return _new_request(RequestType.TEXT, prompt, request_id, registries, fields)


def create_chat_request(
    messages: list[dict[str, Any]],
    request_id: str | None = None,
    *,
    registries: Registries | None = None,
    **fields: Any,
) -> OmniRequest:
    """A CHAT request: `messages` as OpenAI's chat API takes them ({role, content}),
    rendered with the model's chat template on the worker."""
    sampling = fields.pop("sampling_params", None)
    if sampling is not None:
        fields = {**_sampling_fields(sampling), **fields}
    return _new_request(
        RequestType.CHAT, None, request_id, registries, {"messages": messages, **fields}
    )


def create_diffusion_request(
    prompt: str,
    request_id: str | None = None,
    *,
    registries: Registries | None = None,
    **fields: Any,
) -> OmniRequest:
    return _new_request(RequestType.DIFFUSION, prompt, request_id, registries, fields)


def create_image_request(
    prompt: str,
    image: str | bytes,
    request_id: str | None = None,
    *,
    registries: Registries | None = None,
    **fields: Any,
) -> OmniRequest:
    """An IMAGE request (img2img / edit) from inline image data: raw bytes, base64 or a
    data: URL. To send a local file, pass `encode_image_file(path)`."""
    return _new_request(
        RequestType.IMAGE, prompt, request_id, registries, {"image": image, **fields}
    )


def create_video_request(
    prompt: str,
    request_id: str | None = None,
    *,
    registries: Registries | None = None,
    **fields: Any,
) -> OmniRequest:
    """A VIDEO request: `num_frames` (4k+1) or `seconds` at `fps`, the size, steps, and
    an inline `image` for image-to-video (see `omni_tasks.video_fields`)."""
    return _new_request(RequestType.VIDEO, prompt, request_id, registries, fields)


def create_speech_request(
    input: str,
    request_id: str | None = None,
    *,
    registries: Registries | None = None,
    **fields: Any,
) -> OmniRequest:
    """A SPEECH request: `input` spoken in `voice` at `speed`, as `response_format`."""
    return _new_request(
        RequestType.SPEECH, None, request_id, registries, {"input": input, **fields}
    )


def create_audio_request(
    prompt: str,
    request_id: str | None = None,
    *,
    registries: Registries | None = None,
    **fields: Any,
) -> OmniRequest:
    """An AUDIO request: a sound of `seconds` from a prompt, on a diffusion model."""
    return _new_request(RequestType.AUDIO, prompt, request_id, registries, fields)


def create_multimodal_request(
    prompt: str,
    request_id: str | None = None,
    *,
    registries: Registries | None = None,
    **fields: Any,
) -> OmniRequest:
    return _new_request(RequestType.MULTIMODAL, prompt, request_id, registries, fields)


def request_from_task_kwargs(
    request_type: RequestType, kwargs: dict[str, Any], registries: Registries
) -> OmniRequest:
    """Validate the kwargs of `generate_*.delay(...)` into a request of that type, its
    names checked against `registries` (those of the app sending it)."""
    kind = kwargs.get("request_type", request_type.value)
    if kind != request_type.value and kind != request_type:
        raise RequestValidationError("request_type", f"this task takes {request_type.value}")
    fields = {k: v for k, v in kwargs.items() if k != "request_type"}
    needed = {RequestType.CHAT: "messages", RequestType.SPEECH: "input"}.get(request_type, "prompt")
    if needed not in fields:
        raise RequestValidationError(needed, "field required")
    prompt, request_id = fields.pop("prompt", None), fields.pop("request_id", None)
    return _new_request(request_type, prompt, request_id, registries, fields)


def _sampling_fields(sampling: Any) -> dict[str, Any]:
    names = (
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "n",
        "presence_penalty",
        "frequency_penalty",
    )
    if isinstance(sampling, dict):
        return {k: sampling[k] for k in names if k in sampling}
    found = {k: getattr(sampling, k, None) for k in names}
    return {k: v for k, v in found.items() if v is not None}
