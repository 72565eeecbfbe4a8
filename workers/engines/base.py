"""What the pools need from an engine: small, typed contracts.

A Celery threads pool calls `generate` from many threads at once; each engine is
built once per worker process and shared by all of them. `shutdown()` makes every
in-flight `generate` raise `EngineStoppedError` promptly so the task can hand its
message back to the queue.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from workers.progress import ProgressCallback
    from workers.stepping.request import StepTicket


@dataclass(frozen=True)
class TextParams:
    """Sampling settings of one text request (already validated by `OmniRequest`)."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: Rank of the request's priority class, 0 first (`SchedulerConfig.class_rank`):
    #: engines that schedule by priority serve lower ranks first.
    rank: int = 0
    #: LoRA adapters from the registry: (name, scale) pairs (`omni_tasks.lora.AdapterSet`).
    lora: tuple[tuple[str, float], ...] = ()
    #: Completions to sample from the one prompt.
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: Log-probabilities of the sampled tokens with this many top alternatives each;
    #: None: none.
    logprobs: int | None = None

    def unsupported(self) -> str | None:
        """The first field an engine without `n`, penalties or logprobs would have to
        ignore (it refuses it instead), else None."""
        unused = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logprobs": None}
        return next((k for k, v in unused.items() if getattr(self, k) != v), None)


#: A text request's input: a prompt, or chat messages ({role, content}) that the engine
#: renders with its model's chat template (`workers.engines.chat`).
TextPrompt = str | Sequence[Mapping[str, str]]
#: What an engine calls with each piece of new text of a streamed request, from its own
#: thread: (choice index, text). It must not block (`workers.text_stream`).
DeltaCallback = Callable[[int, str], None]


@dataclass
class Choice:
    """One completion of a request (a request with `n` > 1 has several)."""

    index: int
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    completion_tokens: int
    #: Per sampled token: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}
    #: (OpenAI's chat shape); None unless asked for.
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class TextOutput:
    """A request's generation: the first choice's text and reason; `choices` holds
    every choice when the request asked for more than one, or for logprobs."""

    text: str
    prompt_tokens: int
    completion_tokens: int  # over all choices
    finish_reason: str  # "stop" | "length" | "abort"
    #: The adapters it ran with: {name, scale, hit, load_s} (`workers.lora.cache.AdapterUse`).
    lora: list[dict[str, Any]] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)

    @classmethod
    def of(
        cls, choices: list[Choice], prompt_tokens: int, lora: list[dict[str, Any]]
    ) -> TextOutput:
        first = choices[0]
        total = sum(c.completion_tokens for c in choices)
        shown = choices if len(choices) > 1 or first.logprobs is not None else []
        return cls(first.text, prompt_tokens, total, first.finish_reason, lora, shown)


class TextEngine(Protocol):
    """An autoregressive engine shared by all threads of one worker process."""

    name: str

    def generate(
        self,
        request_id: str,
        prompt: TextPrompt,
        params: TextParams,
        timeout_s: float,
        *,
        on_progress: ProgressCallback | None = None,
        on_delta: DeltaCallback | None = None,
    ) -> TextOutput:
        """Blocks until done; raises RequestTimeoutError / EngineStoppedError.

        `on_progress` gets `{"tokens": n, "max_tokens": N}` now and then while the request
        generates, from the engine's own thread: it must be cheap and not block (its
        exceptions are logged, never raised into the engine). `on_delta` gets the new
        text of each step as it is made; the pieces of a choice join to its final text.
        """
        ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class StepCacheSettings:
    """Step-level DiT acceleration of one diffusion request (see `workers.engines.step_cache`).

    `mode` is one of `step_cache.STEP_CACHE_MODES`: none | taylorseer | magcache | first_block
    | pab | cache_dit. `params` overrides that mode's documented defaults by name (numbers
    only; integer settings take integral values). The engine validates both and raises
    `ConfigError` naming `step_cache` or `step_cache_params.<name>`.
    """

    mode: str = "none"
    params: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageParams:
    """Settings of one diffusion request (already validated by `OmniRequest`)."""

    width: int = 64
    height: int = 64
    steps: int = 4
    guidance: float = 3.5
    seed: int = 0
    negative_prompt: str | None = None
    #: True CFG's scale with a negative prompt; None: the engine's default.
    true_cfg_scale: float | None = None
    strength: float = 0.6  # img2img only
    step_cache: StepCacheSettings = StepCacheSettings()
    #: LoRA adapters from the registry: (name, scale) pairs (`omni_tasks.lora.AdapterSet`).
    lora: tuple[tuple[str, float], ...] = ()
    #: A video's frame count; None: an image.
    num_frames: int | None = None
    #: A sound's length in seconds (an audio family); None: not a sound.
    audio_seconds: float | None = None


@dataclass
class ImageOutput:
    """One generated image, plus what a worker may keep to skip stages of a later request.

    `steps_run`: denoising steps in which the transformer's block stack actually ran (with
    step caching, fewer than the steps taken; 0 when only decoding). `denoise_steps`: the
    scheduler steps taken (`steps`, or `steps * strength` for img2img; 0 when only decoding).
    `embeds`: the prompt embeddings used (`prompt_embeds`, `pooled_prompt_embeds`, plus
    `negative_prompt_embeds`, `negative_pooled_prompt_embeds` under true CFG), `None` when
    the request only decoded given latents. `latents`: the final denoised latents before the
    VAE, unpacked to (1, channels, height / 8, width / 8) and not yet scaled or shifted. Both
    stay on the engine's device. `timings` (seconds): encode_s, denoise_s, decode_s (0 for
    skipped phases), paused_s (time preempted), first_step_at (wall clock of its first
    denoising step) and total_s, whose remainder is mostly
    waiting for the step scheduler; calibrate_s too when the request had to calibrate
    MagCache first. `preemptions`: times the step scheduler paused it; `max_batch`: the
    most requests any of its steps ran with. A sound has no `image` (None): its
    `audio` instead.
    """

    image: Image.Image | None
    steps_run: int
    timings: dict[str, float] = field(default_factory=dict)
    denoise_steps: int = 0
    embeds: dict[str, torch.Tensor] | None = None
    latents: torch.Tensor | None = None
    preemptions: int = 0
    max_batch: int = 0
    lora: list[dict[str, Any]] = field(default_factory=list)  # as `TextOutput.lora`
    #: A video's frames, (frames, height, width, 3) uint8; `image` is then its first.
    frames: np.ndarray | None = None
    #: A sound's waveform, (channels, samples) float32 at `sample_rate` Hz.
    audio: np.ndarray | None = None
    sample_rate: int | None = None


class DiffusionEngine(Protocol):
    """A diffusion pipeline shared by all threads of one worker process."""

    name: str

    def runs_step_cache(self, mode: str) -> bool:
        """Whether this engine's model runs step-cache `mode`."""
        ...

    def generate(
        self,
        request_id: str,
        prompt: str,
        params: ImageParams,
        timeout_s: float,
        init_image: Image.Image | None = None,
        *,
        embeds: dict[str, torch.Tensor] | None = None,
        latents: torch.Tensor | None = None,
        ticket: StepTicket | None = None,
    ) -> ImageOutput:
        """Text-to-image, or img2img when `init_image` is given; blocks until done.

        `embeds` (from an earlier `ImageOutput.embeds`) skips the text encoders; `latents`
        (from an earlier `ImageOutput.latents`) skips everything but the VAE decode;
        `ticket`: how the worker's step scheduler ranks, cancels and reports the request.
        """
        ...

    def shutdown(self) -> None: ...
