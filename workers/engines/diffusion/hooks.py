"""Per-request state, filled by hooks on the transformer that every thread shares.

The hooks stay on the transformer for the engine's lifetime and find the request they serve
through a context variable, set in the request's own thread: a pipeline call counts steps
and blocks for its own request only, and a call with no request set (MagCache
calibration) counts nothing. They also check the request's deadline and shutdown before
the first step and after every step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omni_tasks.errors import EngineStoppedError, RequestTimeoutError
from workers.engines import step_cache

if TYPE_CHECKING:
    import torch

StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]
#: Told of each step's latents once the step has ended: (step, steps, latents); 1-based.
LatentsObserver = Callable[[int, int, Any], None]
#: Submodules that run on every run of a transformer block, by family (Flux, SD3, Sana:
#: `ff` / `proj_out`; Qwen-Image: `img_mlp`).
_BLOCK_MARKERS = ("proj_out", "ff", "img_mlp", "mlp", "ffn")


@dataclass
class Request:
    """Per-request state, reached from the transformer hooks through a context variable."""

    request_id: str
    deadline: float
    started: float = field(default_factory=time.perf_counter)
    encode_s: float = 0.0
    calibrate_s: float | None = None
    pipe_start: float | None = None
    waited_s: float = 0.0  # between preparing and the first step: waiting for a slot
    denoise_start: float | None = None
    last_step_end: float | None = None
    decode_s: float = 0.0
    denoise_steps: int = 0  # scheduler steps taken
    steps_run: int = 0  # of those, steps in which every transformer block ran
    blocks_in_call: int = 0
    full_call: bool = False  # a transformer call of the current step ran every block
    # FluxImg2ImgPipeline (diffusers 0.42) calls the transformer without a cache context,
    # which diffusers' cache hooks need: the hooks below open "cond" / "uncond" for it.
    needs_cache_context: bool = False
    calls_in_step: int = 0
    open_context: Any = None
    timestep: float | None = None  # of the running step (0-1000), for PAB under img2img


class TransformerHooks:
    """Counts steps and blocks of the request running in this thread; checks its deadline."""

    def __init__(self, stopped: threading.Event) -> None:
        self._stopped = stopped
        #: The request the hooks count for in this thread: each request runs its pipeline
        #: call in its own (Celery task) thread, whose context is its own.
        self._serving: ContextVar[Request | None] = ContextVar(
            f"omni_hooks_request_{id(self)}", default=None
        )
        self._num_blocks = 0

    def install(self, transformer: torch.nn.Module) -> None:
        """Put the hooks on `transformer`, for good; raises ConfigError for unknown blocks."""
        transformer.register_forward_pre_hook(self._before_transformer, with_kwargs=True)
        transformer.register_forward_hook(self._after_transformer)
        # A submodule of each block runs only when the block's own forward does (a cache hook
        # that skips a block replaces its forward, and torch hooks on the block itself would
        # still fire).
        # A family whose blocks have none of the known markers counts whole calls only.
        markers = [_block_marker(b) for b in _blocks(transformer)]
        if markers and all(marker is not None for marker in markers):
            for marker in markers:
                marker.register_forward_hook(self._block_ran)
        self._num_blocks = len(markers) if markers and None not in markers else 0

    @contextmanager
    def serving(self, request: Request | None) -> Iterator[None]:
        """Let the hooks count for `request` in this thread (None: for nobody) meanwhile."""
        token = self._serving.set(request)
        try:
            yield
        finally:
            self._serving.reset(token)

    def check(self, request: Request) -> None:
        """Raise EngineStoppedError after shutdown, RequestTimeoutError past the deadline."""
        if self._stopped.is_set():
            raise EngineStoppedError(f"{request.request_id}: diffusion engine shut down")
        if time.perf_counter() > request.deadline:
            raise RequestTimeoutError(
                f"{request.request_id}: timed out after {request.denoise_steps} denoising steps"
            )

    def step_callback(
        self,
        request: Request,
        on_step: Callable[[], None] | None = None,
        on_latents: LatentsObserver | None = None,
    ) -> StepCallback:
        """The pipeline's `callback_on_step_end`: closes a step's counts, runs `on_step`
        (progress, cancellation), checks, then shows `on_latents` the step's latents
        (previews)."""

        def on_step_end(
            pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            request.denoise_steps += 1
            if request.full_call:
                request.steps_run += 1
            request.full_call = False
            request.calls_in_step = 0
            request.last_step_end = time.perf_counter()
            if on_step is not None:
                on_step()
            self.check(request)
            latents = tensors.get("latents")
            if on_latents is not None and latents is not None:
                on_latents(step + 1, int(getattr(pipe, "num_timesteps", 0) or 0), latents)
            return tensors

        return on_step_end

    def _current(self) -> Request | None:
        return self._serving.get()

    def _before_transformer(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        """Forward pre-hook on the shared transformer; a no-op outside `generate`."""
        request = self._current()
        if request is None:
            return
        request.blocks_in_call = 0
        if request.denoise_start is None:  # preparation done: check before the first step too
            request.denoise_start = time.perf_counter()
            self.check(request)
        if request.needs_cache_context:
            timestep = kwargs.get("timestep")  # the pipelines pass t / 1000
            if timestep is not None:
                request.timestep = float(timestep.flatten()[0]) * 1000
            name = "cond" if request.calls_in_step == 0 else "uncond"
            request.open_context = module.cache_context(name)
            request.open_context.__enter__()
        request.calls_in_step += 1

    def _block_ran(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        request = self._current()
        if request is not None:
            request.blocks_in_call += 1

    def _after_transformer(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        request = self._current()
        if request is None:
            return
        if request.blocks_in_call >= self._num_blocks:
            request.full_call = True
        if request.open_context is not None:
            context, request.open_context = request.open_context, None
            context.__exit__(None, None, None)


def timings(request: Request) -> dict[str, float]:
    """encode_s: text encoders, plus the pipeline's preparation up to the first transformer
    call (latents, timesteps, the init image's VAE encode); denoise_s: from the first step
    to the end of the last one (paused time included); decode_s: the VAE decode and
    postprocessing; 0 for a skipped phase. The rest of total_s is mostly waiting for the
    step scheduler. calibrate_s only when the request had to calibrate MagCache first."""
    end = time.perf_counter()
    encode_s = request.encode_s
    denoise_s = 0.0
    if request.pipe_start is not None and request.denoise_start is not None:
        encode_s += request.denoise_start - request.pipe_start - request.waited_s
        if request.last_step_end is not None:
            denoise_s = request.last_step_end - request.denoise_start
    result = {
        "total_s": end - request.started,
        "encode_s": encode_s,
        "denoise_s": denoise_s,
        "decode_s": request.decode_s,
    }
    if request.calibrate_s is not None:
        result["calibrate_s"] = request.calibrate_s
    return {k: round(v, 6) for k, v in result.items()}


def _blocks(transformer: Any) -> list[Any]:
    try:
        return step_cache.block_stack(transformer)
    except RuntimeError:  # no known block list: whole calls are counted
        return []


def _block_marker(block: Any) -> Any:
    """A submodule that runs on every run of `block`, or None where none is known."""
    for name in _BLOCK_MARKERS:
        marker = getattr(block, name, None)
        if marker is not None:
            return marker
    return None
