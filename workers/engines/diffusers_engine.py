"""A diffusion engine on diffusers, for every model family, shared by the threads of one
worker.

The checkpoint's family (`workers.engines.families`: Flux, SD3, Qwen-Image, ...) says
how its pipeline encodes, denoises and decodes; everything else is the same for all of
them. A request runs in three phases, each of which a caller may skip with what an earlier
request returned (`ImageOutput.embeds`, `ImageOutput.latents`):

1. encode: the family's text encoders, prompts of requests arriving together in one call;
   skipped with `embeds=`;
2. denoise: the family's pipeline with those embeddings and `output_type="latent"`, its
   transformer calls batched with other requests' by the step loop; skipped (with 1)
   with `latents=`;
3. decode: the VAE and image processor exactly as the pipeline does it, so a decode of
   returned latents gives the same pixels.

One shared pipeline object cannot serve two threads at once (its scheduler keeps the step
index), so every request gets its own light pipeline object built around the shared,
loaded modules with a fresh scheduler. Step caches (`ImageParams.step_cache`, see
`workers.engines.step_cache`) put stateful hooks on the one transformer all threads share,
so such a request holds the transformer alone (`StepLoop.exclusive`) and the hooks are
removed right after its call, whatever happens.

What the engine reports goes to what the worker gives it: `counters` (batches and
preemptions) and each request's `StepTicket` (progress, cancellation, previews).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

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
from workers.engines.diffusion.batching import denoise_batched, run_batch
from workers.engines.diffusion.hooks import LatentsObserver, Request, TransformerHooks, timings
from workers.engines.diffusion.magcache import MagCacheRatios
from workers.engines.diffusion.phases import (
    PromptEncoder,
    device_and_dtype,
    given_latents,
    load_pipeline,
    request_pipeline,
    split_embeds,
)
from workers.engines.diffusion.previews import previewer
from workers.engines.diffusion.probe import shape_probe
from workers.engines.families import GenericFamily, ModelFamily, check_rows, detect
from workers.lora.cache import AdapterListener, AdapterUse
from workers.lora.diffusion import adapters_for
from workers.resources import ResourceManager, adapter_budget_bytes, resident_bytes
from workers.stepping.arrivals import ArrivalWatch
from workers.stepping.loop import StepCounters, StepLoop
from workers.stepping.request import StepRequest, StepTicket
from workers.stepping.scheduler import StepScheduler

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = ["DiffusersEngine"]

log = logging.getLogger(__name__)
T = TypeVar("T")
# Errors `generate` raises as they are (any other becomes a ProcessingError).
_PASSED_ON = (
    RequestTimeoutError,
    EngineStoppedError,
    RequestValidationError,
    RequestCancelledError,
    RequestYieldedError,
    ResourceError,
    ConfigError,
)


class DiffusersEngine:
    """Loads a checkpoint of any family once; `generate` may be called from many threads.

    The transformer belongs to a step loop (`workers.stepping`): requests without a step
    cache share its denoising steps, up to `max_batch_size` at a time, in the order of
    the config's step scheduler; a request with a step cache runs alone, its hooks on the
    transformer.
    """

    name = "diffusers"

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        family: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_sequence_length: int = 512,
        true_cfg_scale: float = 4.0,
        mag_ratios: Mapping[tuple[int, int, int], Sequence[float]] | None = None,
        max_batch_size: int = 8,
        config: CoreModuleConfig | None = None,
        arrivals: Callable[[int], bool] | None = None,
        adapter_listener: AdapterListener | None = None,
        counters: StepCounters | None = None,
        cache_usage: Callable[[], int] = lambda: 0,
    ) -> None:
        """`family`: the model family (default: read from the checkpoint's model_index.json);
        `true_cfg_scale`: the default scale of requests with a negative prompt where the
        family runs true CFG (it doubles the transformer calls); `max_sequence_length`:
        the text encoders' prompt length where the family has one. `mag_ratios`: MagCache
        ratios from an earlier `calibrate_magcache` of this same checkpoint, keyed by
        (steps, width, height). `max_batch_size`: the most requests one denoising step
        runs; `config`: whose `scheduler` section ranks them (default: the loaded config);
        `arrivals`: whether a message better than a level waits in the worker's queues (see
        `workers.stepping.arrivals`); `adapter_listener`: told of every LoRA adapter
        loaded and unloaded (`workers.lora`); `counters`: told of batches and preemptions;
        `cache_usage`: the bytes the worker's DiT cache holds now (in the memory budget).

        A worker always passes its config; the process config is only the default of a
        standalone engine (a script, a benchmark, a test) built with none, read once here."""
        self.model = str(model)
        self.device, self.dtype = device_and_dtype(device, dtype)
        self.true_cfg_scale = true_cfg_scale
        self._stopped = threading.Event()
        self._hooks = TransformerHooks(self._stopped)
        pipe = self._load_family(family, max_sequence_length)
        config = config or get_config()
        self._build_loop(pipe, config, max_batch_size, adapter_listener, counters, cache_usage)
        self._probe_opts = {"device": self.device, "dtype": self.dtype}
        self._watch = ArrivalWatch(self.loop, arrivals) if arrivals is not None else None
        self._encoder = PromptEncoder(self.family, true_cfg_scale, run_on=self.loop.run)
        self._mag_ratios = MagCacheRatios(self._encoder, self._hooks, mag_ratios)
        log.info("%s: the %s family, on %s", self.model, self.family.name, self.device)

    def _load_family(self, family: str | None, max_sequence_length: int) -> Any:
        """Load the checkpoint's pipeline as its family and hook its transformer."""
        family_cls = detect(self.model, family)
        extra = family_cls.load_kwargs(self.model)
        pipe = load_pipeline(
            family_cls.pipeline_class(), self.model, self.dtype, self.device, extra
        )
        self.family: ModelFamily = family_cls(pipe, self.device, max_sequence_length)
        if isinstance(self.family, GenericFamily):
            check_rows(self.family)
        self._hooks.install(pipe.transformer)
        self.size_multiple: int = self.family.size_multiple
        return pipe

    def _build_loop(
        self,
        pipe: Any,
        config: CoreModuleConfig,
        max_batch_size: int,
        adapter_listener: AdapterListener | None,
        counters: StepCounters | None,
        cache_usage: Callable[[], int],
    ) -> None:
        """The adapters, the memory budget, the step scheduler and the loop that runs the
        steps; probes and adapter loads run where the steps run, on that loop."""
        modules = list(pipe.components.values())
        self.adapters = adapters_for(
            pipe, config, adapter_budget_bytes(config), adapter_listener, self._run_unshared
        )
        self.resources = ResourceManager(
            config,
            self.device,
            resident_bytes(modules, self.device),
            run_on=self._run_on_loop,
            cache_usage=cache_usage,
            adapter_usage=self.adapters.used_bytes,
        )
        self.step_scheduler = StepScheduler(config, resources=self.resources)
        transformer, family = pipe.transformer, self.family
        self.loop = StepLoop(
            self.step_scheduler,
            lambda calls: run_batch(family, transformer, calls, self.adapters),
            max_batch_size,
            counters,
        )

    def _run_on_loop(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the step loop's thread (a `RunOnDevice`)."""
        return self.loop.run(fn)

    def _run_unshared(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the step loop's thread while no request holds the transformer alone."""
        return self.loop.run(fn, unshared=True)

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
        """Text-to-image, or from `init_image` (img2img, resized to width x height; or the
        image an edit family edits).

        `embeds`: prompt embeddings from an earlier `ImageOutput.embeds` (or `encode_prompt`)
        of the same prompt, negative prompt (and image, for an edit family): the text
        encoders are skipped and the pixels are the same as with encoding; missing negative
        ones are encoded when the request needs them. `latents`: from an earlier
        `ImageOutput.latents` of the same request settings: only the VAE decode runs
        (`steps_run` 0), same pixels as that request. `ticket`: how the step scheduler
        ranks, cancels and reports the request (progress, previews).

        Raises RequestTimeoutError once `timeout_s` has passed, RequestCancelledError once
        `ticket.cancelled()` and EngineStoppedError after `shutdown()`, all checked while
        the request waits for a step and after every step; ConfigError for a step cache
        the family cannot run; RequestValidationError for bad sizes, `embeds`, `latents`,
        an image the family cannot take or LoRA adapters it cannot load.
        """
        self._live(request_id)
        self.family.check_request(params, init_image)
        mode_params = step_cache.resolve(params.step_cache)
        request = Request(request_id, deadline=time.perf_counter() + timeout_s)
        ticket = ticket or StepTicket(request_id)
        ticket = dataclasses.replace(
            ticket, deadline=min(ticket.deadline, time.monotonic() + timeout_s)
        )
        self._hooks.check(request)
        held = None if latents is not None else self._step_request(ticket, params, init_image)
        if held is not None:  # ResourceError at once if it could never fit
            self.resources.admit(held, shape_probe(self.family, params, self._probe_opts))
        adapters = self.adapters.using(params.lora if held is not None else (), ticket.deadline)
        try:
            with self._hooks.serving(request), adapters as used:
                with self.loop.holding(held):
                    final, used_embeds = self._final_latents(
                        request, held, prompt, params, init_image, embeds, latents, mode_params
                    )
                self._hooks.check(request)
                start = time.perf_counter()
                decoded = self.loop.run(lambda: self.family.decode(final))
                request.decode_s = time.perf_counter() - start
        except _PASSED_ON:
            raise
        except Exception as exc:
            raise ProcessingError(f"{request_id}: diffusion failed: {exc}") from exc
        finally:
            if held is not None:
                self.resources.release(held)
        media = self.family.output_fields(decoded, params)
        return _output(media, request, held, used_embeds, final, used)

    def runs_step_cache(self, mode: str) -> bool:
        """Whether this model's family runs step-cache `mode` (`ModelFamily.step_caches`)."""
        return mode in self.family.step_caches

    def encode_prompt(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        image: Image.Image | None = None,
        true_cfg_scale: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """The prompt embeddings `generate(..., embeds=)` takes, on the engine's device.

        They depend on the checkpoint, the prompt, the negative prompt (encoded only where
        the family runs CFG with it), the family's text length and, for an edit family,
        the image.
        """
        self._live("encode")
        params = ImageParams(negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale)
        return self._encoder.encode(prompt, params, image)

    def calibrate_magcache(
        self, steps: int, width: int, height: int, timeout_s: float = 3600.0
    ) -> list[float]:
        """MagCache ratios for `steps` steps at width x height, calibrated once and kept.

        A `magcache` request calibrates on first use of its (steps, width, height); call this
        at worker start to take that run (one uncached text-to-image run with a fixed prompt
        and seed) off the first request, and persist `mag_ratios` to pass them to the next
        engine of the same checkpoint.
        """
        self._live("calibrate")
        request = Request("calibrate", deadline=time.perf_counter() + timeout_s)
        ticket = StepTicket("calibrate", deadline=time.monotonic() + timeout_s)
        held = StepRequest(ticket, steps=steps, pixels=width * height, batch_key=None)
        with self.loop.holding(held), self.loop.exclusive(held):
            return list(self._mag_ratios.get_locked(request, steps, width, height))

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

    # --- phases -------------------------------------------------------------------------------

    def _final_latents(
        self,
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
            want = self.family.latent_shape(params)
            return given_latents(latents, want, self.device), None
        start = time.perf_counter()
        if embeds is None:
            urgent = self.loop.would_preempt(held)
            used_embeds = self._encoder.encode(prompt, params, init_image, urgent)
        else:
            used_embeds = self._encoder.given_embeds(embeds, params, init_image)
        request.encode_s = time.perf_counter() - start
        if held.batch_key is not None:  # the text length is known now
            held.batch_key = self._batch_key(params, used_embeds, init_image)
        held.encoded = True  # its first call follows within milliseconds
        kwargs = self._encoder.denoise_kwargs(used_embeds, params, init_image, None, prompt)
        with_image = init_image is not None
        on_latents = previewer(self.family, self.loop, held.ticket, params)
        if params.step_cache.mode == "none":
            out = denoise_batched(
                self.family,
                self.loop,
                self._hooks,
                request,
                held,
                kwargs,
                with_image,
                params.lora,
                on_latents,
            )
        else:
            out = self._denoise_alone(
                request, held, kwargs, params, mode_params, with_image, on_latents
            )
        return self.family.unpack(out, params), used_embeds

    def _denoise_alone(
        self,
        request: Request,
        held: StepRequest,
        kwargs: dict[str, object],
        params: ImageParams,
        mode_params: dict[str, float | int],
        with_image: bool,
        on_latents: LatentsObserver | None,
    ) -> torch.Tensor:
        """The pipeline call with a step cache's hooks on the transformer, which this
        request holds alone meanwhile."""
        pipe = request_pipeline(self.family.pipe, self.family.pipeline_class(with_image))
        kwargs["callback_on_step_end"] = self._hooks.step_callback(
            request, held.step_ended, on_latents
        )
        num_steps = self.family.steps_taken(params, with_image)
        mode = params.step_cache.mode
        img2img = with_image and not self.family.edit
        request.needs_cache_context = img2img and mode in step_cache.DIFFUSERS_MODES
        with self.loop.exclusive(held):
            self._hooks.check(request)
            self.adapters.activate(params.lora)
            ratios = None
            if mode == "magcache":
                full = self._mag_ratios.get_locked(
                    request, params.steps, params.width, params.height
                )
                ratios = step_cache.magcache_ratios_for(full, params.steps, num_steps)
            request.pipe_start = time.perf_counter()
            with step_cache.applied(
                pipe,
                mode,
                mode_params,
                num_steps=num_steps,
                true_cfg="negative_prompt_embeds" in kwargs,
                mag_ratios=ratios,
                current_timestep=(lambda: request.timestep) if img2img else None,
            ):
                return self.family.call_pipeline(pipe, kwargs)

    # --- plumbing -----------------------------------------------------------------------------

    def _batch_key(
        self, params: ImageParams, embeds: Mapping[str, Any], image: Image.Image | None
    ) -> Any:
        """The family's key, plus the LoRA adapter set unless rows may mix sets."""
        positive, _ = split_embeds(embeds)
        key = self.family.batch_key(params, positive, image)
        lora = None if self.adapters.mixed_batches else params.lora
        return key if key is None or lora is None else (*key, lora)

    def _step_request(
        self, ticket: StepTicket, params: ImageParams, init_image: Image.Image | None
    ) -> StepRequest:
        batched = params.step_cache.mode == "none"
        # Before encoding, the key assumes the family's nominal text length; it is set
        # from the embeddings once they are known.
        nominal = {"prompt_embeds": None}
        shape = self.family.batch_key(params, nominal, init_image)  # what memory is measured by
        return StepRequest(
            ticket,
            steps=self.family.steps_taken(params, init_image is not None),
            pixels=self.family.step_pixels(params),
            batch_key=self._batch_key(params, nominal, init_image) if batched else None,
            shape=shape,
        )

    def _live(self, request_id: str) -> None:
        if self._stopped.is_set():
            raise EngineStoppedError(f"{request_id}: diffusion engine is shut down")


def _output(
    media: dict[str, Any],
    request: Request,
    held: StepRequest | None,
    embeds: dict[str, torch.Tensor] | None,
    final: torch.Tensor,
    adapters: list[AdapterUse],
) -> ImageOutput:
    """`media`: the family's `output_fields` (image, frames or audio)."""
    figures = timings(request)
    figures["paused_s"] = round(held.paused_s, 6) if held is not None else 0.0
    if held is not None and held.first_step_at is not None:
        figures["first_step_at"] = round(held.first_step_at, 6)
    return ImageOutput(
        **media,
        steps_run=request.steps_run,
        timings=figures,
        denoise_steps=request.denoise_steps,
        embeds=embeds,
        latents=final,
        preemptions=held.preemptions if held is not None else 0,
        max_batch=held.max_batch if held is not None else 0,
        lora=[use.to_json() for use in adapters],
    )
