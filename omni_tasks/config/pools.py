"""The pool sections of the configuration: a pool's queue, Celery pool type and
concurrency (`PoolConfig`), and what the AR, diffusion and speech pools add, with the
LoRA settings their workers share. `validate(name)` raises `ConfigError` naming the
dotted field of the first bad value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omni_tasks.errors import ConfigError
from omni_tasks.vocabulary import POOL_TYPES, STEP_CACHE_MODES


@dataclass
class PoolConfig:
    """How the workers of one pool run when started with just `-Q <queue>`.

    A pool is the set of workers that consume one queue; `pool_type` is the Celery
    execution pool each of them runs (`--pool`).
    """

    queue: str = "ar"
    pool_type: str = "threads"
    concurrency: int = 32
    prefetch_multiplier: int = 1

    def validate(self, name: str) -> None:
        require(bool(self.queue), f"{name}.queue", "must not be empty")
        # kombu joins a queue's binding fields (and its priority lists) with ":".
        require(":" not in self.queue, f"{name}.queue", "must not contain ':'")
        require(
            self.pool_type in POOL_TYPES,
            f"{name}.pool_type",
            "must be threads, solo or prefork",
        )
        require(self.concurrency > 0, f"{name}.concurrency", "must be positive")
        require(self.prefetch_multiplier > 0, f"{name}.prefetch_multiplier", "must be positive")


@dataclass
class ARConfig(PoolConfig):
    """The autoregressive pool: engine and model."""

    engine: str = "vllm"  # vllm | transformers
    model: str = "tiny-llama"
    dtype: str = "auto"
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    kv_cache_gib: float = 1.0  # CPU only: vLLM's KV cache size
    max_batch_size: int = 16  # transformers engine only
    #: The chat template for chat requests when the model's tokenizer has none (or to
    #: replace its own): Jinja text, or the path of a file that holds it.
    chat_template: str | None = None

    def validate(self, name: str = "ar") -> None:
        super().validate(name)
        require(
            self.engine in ("vllm", "transformers"),
            f"{name}.engine",
            "must be vllm or transformers",
        )
        require(bool(self.model), f"{name}.model", "must not be empty")
        require(self.max_model_len > 0, f"{name}.max_model_len", "must be positive")
        require(self.kv_cache_gib > 0, f"{name}.kv_cache_gib", "must be positive")


#: vLLM's allowed values of `max_lora_rank`.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class LoraConfig:
    """How workers keep the LoRA adapters of the `loras` registry (docs/models.md, "LoRA").

    AR pool (vLLM's multi-LoRA): `max_loras` distinct adapters in one batch, ranks up to
    `max_lora_rank` (several adapters or a scale other than 1 in one request make one
    combined adapter, whose rank is the sum of theirs), `max_cpu_loras` kept loaded.
    Diffusion pool: `memory_gib` of device memory, out of the worker's budget, for the
    adapters loaded into the transformer (least recently used ones go first);
    `mixed_batches`: requests with different adapter sets share a denoising step, each
    row with its own LoRA deltas (off: a step batches one adapter set and scales).
    """

    max_loras: int = 4
    max_lora_rank: int = 32
    max_cpu_loras: int = 16
    memory_gib: float = 0.5
    mixed_batches: bool = False

    def validate(self) -> None:
        require(self.max_loras > 0, "lora.max_loras", "must be positive")
        require(self.max_lora_rank in LORA_RANKS, "lora.max_lora_rank", f"one of {LORA_RANKS}")
        require(self.max_cpu_loras >= self.max_loras, "lora.max_cpu_loras", "must be >= max_loras")
        require(self.memory_gib > 0, "lora.memory_gib", "must be positive")


@dataclass
class DiffusionConfig(PoolConfig):
    """The diffusion pool: pipeline and model.

    `concurrency` is how many requests a worker holds (reserved, unacked): the ones its
    step scheduler runs together, at most `max_batch_size`, and a lookahead it can rank
    against them (a later high-class arrival preempts a running low-class one).
    """

    queue: str = "diffusion"
    concurrency: int = 10
    max_batch_size: int = 8
    model: str = "tiny-flux"
    # The models a video request that names none runs on: text-to-video, and with an
    # input image (image-to-video). Both count as registered, like `model`.
    video_model: str = "tiny-wan"
    video_image_model: str = "tiny-wan-i2v"
    # The model a text-to-audio request that names none runs on (registered too).
    audio_model: str = "tiny-stable-audio"
    device: str = "auto"
    dtype: str = "auto"
    step_cache: str = "none"  # one of STEP_CACHE_MODES; requests may override
    step_cache_params: dict[str, float] = field(default_factory=dict)
    cache_affinity: bool = True  # route repeats to the worker holding their DiT cache keys

    def validate(self, name: str = "diffusion") -> None:
        super().validate(name)
        for part in DEFAULT_MODEL_FIELDS:
            require(bool(getattr(self, part)), f"{name}.{part}", "must not be empty")
        require(self.max_batch_size > 0, f"{name}.max_batch_size", "must be positive")
        require(
            self.step_cache in STEP_CACHE_MODES,
            f"{name}.step_cache",
            f"must be one of {STEP_CACHE_MODES}",
        )


#: The diffusion pool's default models, one per kind of request (`default_model`).
DEFAULT_MODEL_FIELDS = ("model", "video_model", "video_image_model", "audio_model")
#: The voices of the embedded tiny VITS (four speakers), by OpenAI's names.
TINY_VOICES = {"alloy": 0, "echo": 1, "fable": 2, "nova": 3}


@dataclass
class SpeechConfig(PoolConfig):
    """The speech pool: a text-to-speech model on transformers (VITS / MMS-TTS).

    `concurrency` requests run at once on a worker, their pieces batched together (at
    most `max_batch_size` a forward pass, those with the same voice and speed). `voices`
    names the model's speakers (name -> speaker id): what requests and
    `GET /v1/audio/voices` use; a request may also give a speaker id ("2"). A request
    without a voice speaks in `default_voice` (None: the first of `voices`).
    """

    queue: str = "speech"
    concurrency: int = 8
    engine: str = "transformers"
    model: str = "tiny-tts"
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 8
    voices: dict[str, int] = field(default_factory=lambda: dict(TINY_VOICES))
    default_voice: str | None = None

    def validate(self, name: str = "speech") -> None:
        super().validate(name)
        require(self.engine == "transformers", f"{name}.engine", "must be transformers")
        require(bool(self.model), f"{name}.model", "must not be empty")
        require(self.max_batch_size > 0, f"{name}.max_batch_size", "must be positive")
        require(bool(self.voices), f"{name}.voices", "must name at least one voice")
        for voice, speaker in self.voices.items():
            require(
                bool(voice.strip()) and not voice.isdigit(),
                f"{name}.voices.{voice}",
                "a voice name must not be blank or a number (numbers are speaker ids)",
            )
            require(
                isinstance(speaker, int) and speaker >= 0,
                f"{name}.voices.{voice}",
                "must be a speaker id (an integer >= 0)",
            )
        require(
            self.default_voice is None or self.default_voice in self.voices,
            f"{name}.default_voice",
            "must be one of the voices",
        )

    def voice_name(self) -> str:
        """The voice of a request that names none."""
        return self.default_voice or next(iter(self.voices))


def require(ok: bool, field_name: str, message: str) -> None:
    """`ConfigError(field_name, message)` unless `ok`."""
    if not ok:
        raise ConfigError(field_name, message)
