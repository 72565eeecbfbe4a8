"""What the pools need from an engine: small, typed contracts.

A Celery threads pool calls `generate` from many threads at once; each engine is
built once per worker process and shared by all of them. `shutdown()` makes every
in-flight `generate` raise `EngineStoppedError` promptly so the task can hand its
message back to the queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class TextParams:
    """Sampling settings of one text request (already validated by `OmniRequest`)."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class TextOutput:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "abort"


class TextEngine(Protocol):
    """An autoregressive engine shared by all threads of one worker process."""

    name: str

    def generate(
        self, request_id: str, prompt: str, params: TextParams, timeout_s: float
    ) -> TextOutput:
        """Blocks until done; raises RequestTimeoutError / EngineStoppedError."""
        ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class ImageParams:
    """Settings of one diffusion request (already validated by `OmniRequest`)."""

    width: int = 64
    height: int = 64
    steps: int = 4
    guidance: float = 3.5
    seed: int = 0
    negative_prompt: str | None = None
    strength: float = 0.6  # img2img only


@dataclass
class ImageOutput:
    image: Image.Image
    steps_run: int
    timings: dict[str, float] = field(default_factory=dict)


class DiffusionEngine(Protocol):
    """A diffusion pipeline shared by all threads of one worker process."""

    name: str

    def generate(
        self,
        request_id: str,
        prompt: str,
        params: ImageParams,
        timeout_s: float,
        init_image: Image.Image | None = None,
    ) -> ImageOutput:
        """Text-to-image, or img2img when `init_image` is given; blocks until done."""
        ...

    def shutdown(self) -> None: ...
