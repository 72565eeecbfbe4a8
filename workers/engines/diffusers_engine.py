"""A Flux text-to-image / img2img engine on diffusers, shared by the threads of one worker.

A request runs in three phases, each of which a caller may skip with what an earlier
request returned (`ImageOutput.embeds`, `ImageOutput.latents`):

1. encode: the CLIP and T5 text encoders (`encode_prompt`); skipped with `embeds=`;
2. denoise: the pipeline with `prompt_embeds=...` and `output_type="latent"`; skipped
   (with 1) with `latents=`;
3. decode: unpack, scaling/shift factor, `vae.decode`, image processor, exactly as the
   pipeline does it, so a decode of returned latents gives the same pixels.

One shared pipeline object cannot serve two threads at once (its scheduler keeps the step
index), so every request gets its own light pipeline object built around the shared, loaded
modules with a fresh scheduler. Step caches (`ImageParams.step_cache`, see
`workers.engines.step_cache`) put stateful hooks on the one transformer all threads share, so
the denoise phase runs under one lock (on a CPU, as fast as parallel pipelines) and the hooks
are enabled for one request's pipeline call and removed right after it, whatever happens.
Encoding and decoding run outside that lock. A request without step caching gives the same
pixels as before, concurrently or not.

The parts live in `workers.engines.flux`: the per-request state and the transformer hooks
that fill it (`hooks`), the phases (`phases`) and MagCache calibration (`magcache`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from omni_tasks.config import CoreModuleConfig, get_config
from omni_tasks.errors import (
    ConfigError,
    EngineStoppedError,
    ProcessingError,
    RequestCancelledError,
    RequestTimeoutError,
    RequestValidationError,
    RequestYieldedError,
    ResourceError,
)
from workers.engines import step_cache
from workers.engines.base import ImageOutput, ImageParams
from workers.engines.flux.batching import batch_key, denoise_batched, run_batch
from workers.engines.flux.hooks import Request, TransformerHooks, timings
from workers.engines.flux.magcache import (
    MAGCACHE_CALIBRATION_GUIDANCE,
    MAGCACHE_CALIBRATION_PROMPT,
    MAGCACHE_CALIBRATION_SEED,
    MagCacheRatios,
)
from workers.engines.flux.phases import (
    EMBED_KEYS,
    NEGATIVE_EMBED_KEYS,
    PromptEncoder,
    decode,
    given_latents,
    load_pipeline,
    request_pipeline,
    steps_taken,
    unpack,
)
from workers.engines.flux.probe import shape_probe
from workers.lora.cache import AdapterListener, AdapterUse
from workers.lora.flux import adapters_for
from workers.resources import ResourceManager, resident_bytes
from workers.stepping.arrivals import ArrivalWatch
from workers.stepping.loop import StepLoop
from workers.stepping.request import StepRequest, StepTicket
from workers.stepping.scheduler import StepScheduler

if TYPE_CHECKING:
    import torch
    from diffusers import FluxPipeline
    from PIL import Image

__all__ = [
    "EMBED_KEYS",
    "MAGCACHE_CALIBRATION_GUIDANCE",
    "MAGCACHE_CALIBRATION_PROMPT",
    "MAGCACHE_CALIBRATION_SEED",
    "NEGATIVE_EMBED_KEYS",
    "FluxDiffusionEngine",
]

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_DTYPES.update(fp32="float32", bf16="bfloat16", fp16="float16")
# Errors `generate` raises as they are (any other becomes a ProcessingError).
_PASSED_ON = (
    RequestTimeoutError,
    EngineStoppedError,
    RequestValidationError,
    RequestCancelledError,
    RequestYieldedError,
    ResourceError,
)


class FluxDiffusionEngine:
    """Loads a Flux checkpoint once; `generate` may be called from many threads at once.

    The transformer belongs to a step loop (`workers.stepping`): requests without a step
    cache share its denoising steps, up to `max_batch_size` at a time, in the order of
    `scheduler` (the config's step scheduler by default); a request with a step cache runs
    alone, its hooks on the transformer.
    """

    name = "diffusers"

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_sequence_length: int = 512,
        true_cfg_scale: float = 4.0,
        mag_ratios: Mapping[tuple[int, int, int], Sequence[float]] | None = None,
        max_batch_size: int = 8,
        config: CoreModuleConfig | None = None,
        arrivals: Callable[[], int | None] | None = None,
        adapter_listener: AdapterListener | None = None,
    ) -> None:
        """`true_cfg_scale` applies only to requests with a negative prompt (true CFG
        doubles the transformer calls); `max_sequence_length` is the T5 prompt length.
        `mag_ratios`: MagCache ratios from an earlier `calibrate_magcache` of this same
        checkpoint (or published ones, stretched to the step count as diffusers does), keyed
        by (steps, width, height), to skip calibrating them again. `max_batch_size`: the
        most requests one denoising step runs; `config`: whose `scheduler` section ranks
        them (default: the loaded config); `arrivals`: reads the best priority waiting in
        the worker's queues (see `workers.stepping.arrivals`); `adapter_listener`: told
        of every LoRA adapter loaded and unloaded (`workers.lora`)."""
        self.model = str(model)
        self.device, self.dtype = _device_and_dtype(device, dtype)
        self.max_sequence_length = max_sequence_length
        self.true_cfg_scale = true_cfg_scale
        self._stopped = threading.Event()
        self._hooks = TransformerHooks(self._stopped)
        pipe = load_pipeline(self.model, self.dtype, self.device)
        self._hooks.install(pipe.transformer)
        self._base: FluxPipeline | None = pipe
        # Latent 2x2 packing after the VAE's downsampling: sizes must be multiples of this.
        self.size_multiple: int = pipe.vae_scale_factor * 2
        self.latent_channels: int = pipe.transformer.config.in_channels // 4
        transformer = pipe.transformer
        config = config or get_config()
        modules = list(pipe.components.values())
        self.resources = ResourceManager(config, self.device, resident_bytes(modules, self.device))
        self.step_scheduler = StepScheduler(config, resources=self.resources)
        self.adapters = adapters_for(pipe, config, self.resources, adapter_listener)
        self.loop = StepLoop(
            self.step_scheduler,
            lambda calls: run_batch(transformer, calls, self.adapters),
            max_batch_size,
        )
        self.resources.run_on = self.loop.run  # probes run where the steps run
        self.adapters.run_on = functools.partial(self.loop.run, unshared=True)
        self._probe_at = (max_sequence_length, {"device": self.device, "dtype": self.dtype})
        self._watch = ArrivalWatch(self.loop, arrivals) if arrivals is not None else None
        self._encoder = PromptEncoder(
            self.device, max_sequence_length, true_cfg_scale, run_on=self.loop.run
        )
        self._mag_ratios = MagCacheRatios(self._encoder, self._hooks, mag_ratios)

    # --- public API ---------------------------------------------------------------------------

    def generate(
        self,
        request_id: str,
        prompt: str,
        params: ImageParams,
        timeout_s: float,
        init_image: Image.Image | None = None,
        *,
        embeds: Mapping[str, torch.Tensor] | None = None,
        latents: torch.Tensor | None = None,
        ticket: StepTicket | None = None,
    ) -> ImageOutput:
        """Text-to-image, or img2img from `init_image` (resized to width x height).

        `embeds`: prompt embeddings from an earlier `ImageOutput.embeds` (or `encode_prompt`)
        of the same prompt and negative prompt: the text encoders are skipped and the pixels
        are the same as with encoding. If the request has a negative prompt (true CFG) but
        `embeds` lacks the negative ones, those are encoded; negative ones are ignored when
        it has none. `latents`: from an earlier `ImageOutput.latents` of the same request
        settings: only the VAE decode runs (`steps_run` 0), same pixels as that request.
        `ticket`: how the step scheduler ranks, cancels and reports the request.

        Raises RequestTimeoutError once `timeout_s` has passed, RequestCancelledError once
        `ticket.cancelled()` and EngineStoppedError after `shutdown()`, all checked while
        the request waits for a step and after every step; ConfigError for bad
        `params.step_cache`; RequestValidationError for bad sizes, `embeds` or `latents`.
        """
        base = self._live_base(request_id)
        self._check_size(params)
        mode_params = step_cache.resolve(params.step_cache)
        request = Request(request_id, deadline=time.perf_counter() + timeout_s)
        ticket = ticket or StepTicket(request_id)
        ticket = dataclasses.replace(
            ticket, deadline=min(ticket.deadline, time.monotonic() + timeout_s)
        )
        self._hooks.check(request)
        held = None if latents is not None else self._step_request(ticket, params, init_image)
        if held is not None:  # ResourceError at once if it could never fit
            probe = shape_probe(base.transformer, params, self.size_multiple, *self._probe_at)
            self.resources.admit(held, probe)
        adapters = self.adapters.using(params.lora if held is not None else (), ticket.deadline)
        try:
            with self._hooks.serving(request), adapters as used:
                with self.loop.holding(held):
                    final, used_embeds = self._final_latents(
                        base,
                        request,
                        held,
                        prompt,
                        params,
                        init_image,
                        embeds,
                        latents,
                        mode_params,
                    )
                self._hooks.check(request)
                start = time.perf_counter()
                image = self.loop.run(lambda: decode(base, final))
                request.decode_s = time.perf_counter() - start
        except _PASSED_ON:
            raise
        except Exception as exc:
            raise ProcessingError(f"{request_id}: diffusion failed: {exc}") from exc
        finally:
            if held is not None:
                self.resources.release(held)
        return _output(image, request, held, used_embeds, final, used)

    def encode_prompt(
        self, prompt: str, negative_prompt: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The prompt embeddings `generate(..., embeds=)` takes, on the engine's device.

        They depend on the checkpoint, the prompt, the negative prompt (encoded only when
        true CFG applies: non-empty and `true_cfg_scale` > 1) and `max_sequence_length`.
        """
        return self._encoder.encode(self._live_base("encode"), prompt, negative_prompt)

    def calibrate_magcache(
        self, steps: int, width: int, height: int, timeout_s: float = 3600.0
    ) -> list[float]:
        """MagCache ratios for `steps` steps at width x height, calibrated once and kept.

        A `magcache` request calibrates on first use of its (steps, width, height); call this
        at worker start to take that run (one uncached text-to-image run with a fixed prompt
        and seed) off the first request, and persist `mag_ratios` to pass them to the next
        engine of the same checkpoint.
        """
        base = self._live_base("calibrate")
        request = Request("calibrate", deadline=time.perf_counter() + timeout_s)
        ticket = StepTicket("calibrate", deadline=time.monotonic() + timeout_s)
        held = StepRequest(ticket, steps=steps, pixels=width * height, batch_key=None)
        with self.loop.holding(held), self.loop.exclusive(held):
            return list(self._mag_ratios.get_locked(base, request, steps, width, height))

    @property
    def mag_ratios(self) -> dict[tuple[int, int, int], list[float]]:
        """The calibrated MagCache ratios by (steps, width, height) (a copy)."""
        return self._mag_ratios.copy()

    def shutdown(self) -> None:
        """Stop in-flight requests at their next step; later calls raise EngineStoppedError.

        The modules are freed once the in-flight requests, which hold references, return.
        """
        self._stopped.set()
        if self._watch is not None:
            self._watch.stop()
        self.loop.stop()
        self._base = None

    # --- phases -------------------------------------------------------------------------------

    def _final_latents(
        self,
        base: FluxPipeline,
        request: Request,
        held: StepRequest | None,
        prompt: str,
        params: ImageParams,
        init_image: Image.Image | None,
        embeds: Mapping[str, torch.Tensor] | None,
        latents: torch.Tensor | None,
        mode_params: dict[str, float | int],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The latents to decode and the embeddings they came from (None when given)."""
        if held is None:
            scale = self.size_multiple // 2  # the VAE's downsampling
            want = (1, self.latent_channels, params.height // scale, params.width // scale)
            return given_latents(latents, want, self.device), None
        start = time.perf_counter()
        negative, cfg = params.negative_prompt, params.true_cfg_scale
        if embeds is None:
            urgent = self.loop.would_preempt(held)
            used_embeds = self._encoder.encode(base, prompt, negative, urgent, cfg)
        else:
            used_embeds = self._encoder.given_embeds(base, embeds, negative, cfg)
        request.encode_s = time.perf_counter() - start
        held.encoded = True  # its first call follows within milliseconds
        img2img = init_image is not None
        kwargs = self._encoder.denoise_kwargs(used_embeds, params, init_image, None)
        if params.step_cache.mode == "none":
            packed = denoise_batched(
                base, self.loop, self._hooks, request, held, kwargs, img2img, params.lora
            )
        else:
            packed = self._denoise_alone(base, request, held, kwargs, params, mode_params, img2img)
        return unpack(packed, params, base), used_embeds

    def _denoise_alone(
        self,
        base: FluxPipeline,
        request: Request,
        held: StepRequest,
        kwargs: dict[str, object],
        params: ImageParams,
        mode_params: dict[str, float | int],
        img2img: bool,
    ) -> torch.Tensor:
        """The pipeline call with a step cache's hooks on the transformer, which this
        request holds alone meanwhile."""
        pipe = request_pipeline(base, img2img=img2img)
        kwargs["callback_on_step_end"] = self._hooks.step_callback(request, held.step_ended)
        num_steps = steps_taken(params, img2img)
        mode = params.step_cache.mode
        request.needs_cache_context = img2img and mode in step_cache.DIFFUSERS_MODES
        with self.loop.exclusive(held):
            self._hooks.check(request)
            self.adapters.activate(params.lora)
            ratios = None
            if mode == "magcache":
                full = self._mag_ratios.get_locked(
                    base, request, params.steps, params.width, params.height
                )
                ratios = step_cache.magcache_ratios_for(full, params.steps, num_steps)
            request.pipe_start = time.perf_counter()
            with step_cache.applied(
                pipe,
                mode,
                mode_params,
                num_steps=num_steps,
                true_cfg=NEGATIVE_EMBED_KEYS[0] in kwargs,
                mag_ratios=ratios,
                current_timestep=(lambda: request.timestep) if img2img else None,
            ):
                return pipe(**kwargs).images

    # --- plumbing -----------------------------------------------------------------------------

    def _step_request(
        self, ticket: StepTicket, params: ImageParams, init_image: Image.Image | None
    ) -> StepRequest:
        batched = params.step_cache.mode == "none"
        size = (params.width, params.height, self.max_sequence_length)
        key = batch_key(*size, None if self.adapters.mixed_batches else params.lora)
        return StepRequest(
            ticket,
            steps=steps_taken(params, init_image is not None),
            pixels=params.width * params.height,
            batch_key=key if batched else None,
            shape=batch_key(*size, None),  # what memory is measured by: adapters aside
        )

    def _live_base(self, request_id: str) -> FluxPipeline:
        base = self._base
        if base is None or self._stopped.is_set():
            raise EngineStoppedError(f"{request_id}: diffusion engine is shut down")
        return base

    def _check_size(self, params: ImageParams) -> None:
        for name in ("width", "height"):
            if getattr(params, name) % self.size_multiple:
                raise RequestValidationError(
                    name, f"must be a multiple of {self.size_multiple} for this model"
                )


def _output(
    image: Image.Image,
    request: Request,
    held: StepRequest | None,
    embeds: dict[str, torch.Tensor] | None,
    final: torch.Tensor,
    adapters: list[AdapterUse],
) -> ImageOutput:
    figures = timings(request)
    figures["paused_s"] = round(held.paused_s, 6) if held is not None else 0.0
    if held is not None and held.first_step_at is not None:
        figures["first_step_at"] = round(held.first_step_at, 6)
    return ImageOutput(
        image=image,
        steps_run=request.steps_run,
        timings=figures,
        denoise_steps=request.denoise_steps,
        embeds=embeds,
        latents=final,
        preemptions=held.preemptions if held is not None else 0,
        max_batch=held.max_batch if held is not None else 0,
        lora=[use.to_json() for use in adapters],
    )


def _device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Resolve "auto": CUDA when available; bfloat16 there, float32 on CPUs."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        # No native bf16 on CPUs: it is slower there than fp32.
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    if dtype not in _DTYPES:
        raise ConfigError("dtype", f"{dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return torch.device(device), getattr(torch, _DTYPES[dtype])
