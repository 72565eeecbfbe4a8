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
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omni_tasks.errors import (
    ConfigError,
    EngineStoppedError,
    ProcessingError,
    RequestTimeoutError,
    RequestValidationError,
)
from workers.engines import step_cache
from workers.engines.base import ImageOutput, ImageParams

if TYPE_CHECKING:
    import torch
    from diffusers import FluxPipeline
    from PIL import Image

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_DTYPES.update(fp32="float32", bf16="bfloat16", fp16="float16")

EMBED_KEYS = ("prompt_embeds", "pooled_prompt_embeds")
NEGATIVE_EMBED_KEYS = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
# MagCache calibration inputs: fixed, so that the ratios (and so every cached image) do not
# depend on which request happened to come first.
MAGCACHE_CALIBRATION_PROMPT = "a detailed photo of a city street at sunset"
MAGCACHE_CALIBRATION_SEED = 0
MAGCACHE_CALIBRATION_GUIDANCE = 3.5
# How often a thread waiting for the transformer looks at its deadline and at shutdown.
_LOCK_POLL_S = 0.05


@dataclass
class _Request:
    """Per-request state, reached from the transformer hooks through a thread-local."""

    request_id: str
    deadline: float
    started: float = field(default_factory=time.perf_counter)
    encode_s: float = 0.0
    calibrate_s: float | None = None
    pipe_start: float | None = None
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


class FluxDiffusionEngine:
    """Loads a Flux checkpoint once; `generate` may be called from many threads at once."""

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
    ) -> None:
        """`true_cfg_scale` applies only to requests with a negative prompt (true CFG
        doubles the transformer calls); `max_sequence_length` is the T5 prompt length.
        `mag_ratios`: MagCache ratios from an earlier `calibrate_magcache` of this same
        checkpoint (or published ones, stretched to the step count as diffusers does), keyed
        by (steps, width, height), to skip calibrating them again."""
        import torch
        from diffusers import FluxPipeline
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            # No native bf16 on CPUs: it is slower there than fp32.
            dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
        if dtype not in _DTYPES:
            raise ConfigError("dtype", f"{dtype!r} is not one of auto, {', '.join(_DTYPES)}")
        self.model = str(model)
        self.device = torch.device(device)
        self.dtype: torch.dtype = getattr(torch, _DTYPES[dtype])
        self.max_sequence_length = max_sequence_length
        self.true_cfg_scale = true_cfg_scale
        self._stopped = threading.Event()
        self._local = threading.local()
        # The transformer (and its cache hooks) serve one pipeline call at a time.
        self._denoise_lock = threading.Lock()
        # Fast tokenizers are not safe to call from several threads at once.
        self._encode_lock = threading.Lock()
        self._mag_ratios: dict[tuple[int, int, int], list[float]] = {
            tuple(key): [float(r) for r in ratios] for key, ratios in (mag_ratios or {}).items()
        }

        # Loading bars are process-wide settings; a worker logs, it has no terminal.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype to dtype
            warnings.simplefilter("ignore", FutureWarning)
            pipe = FluxPipeline.from_pretrained(self.model, torch_dtype=self.dtype)
        pipe.to(self.device)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval()  # from_pretrained does this; be explicit (dropout off)
        pipe.set_progress_bar_config(disable=True)
        transformer = pipe.transformer
        transformer.register_forward_pre_hook(self._before_transformer, with_kwargs=True)
        transformer.register_forward_hook(self._after_transformer)
        # A submodule of each block runs only when the block's own forward does (a cache hook
        # that skips a block replaces its forward, and torch hooks on the block itself would
        # still fire).
        markers = [_block_marker(b) for b in step_cache.block_stack(transformer)]
        for marker in markers:
            marker.register_forward_hook(self._block_ran)
        self._num_blocks = len(markers)
        self._base: FluxPipeline | None = pipe
        # Latent 2x2 packing after the VAE's downsampling: sizes must be multiples of this.
        self.size_multiple: int = pipe.vae_scale_factor * 2
        self.latent_channels: int = transformer.config.in_channels // 4

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
    ) -> ImageOutput:
        """Text-to-image, or img2img from `init_image` (resized to width x height).

        `embeds`: prompt embeddings from an earlier `ImageOutput.embeds` (or `encode_prompt`)
        of the same prompt and negative prompt: the text encoders are skipped and the pixels
        are the same as with encoding. If the request has a negative prompt (true CFG) but
        `embeds` lacks the negative ones, those are encoded; negative ones are ignored when
        it has none. `latents`: from an earlier `ImageOutput.latents` of the same request
        settings: only the VAE decode runs (`steps_run` 0), same pixels as that request.

        Raises RequestTimeoutError once `timeout_s` has passed and EngineStoppedError after
        `shutdown()`, both checked while waiting for the transformer, before the first step
        and after every step; ConfigError for bad `params.step_cache`;
        RequestValidationError for bad sizes, `embeds` or `latents`.
        """
        base = self._live_base(request_id)
        for name in ("width", "height"):
            if getattr(params, name) % self.size_multiple:
                raise RequestValidationError(
                    name, f"must be a multiple of {self.size_multiple} for this model"
                )
        mode_params = step_cache.resolve(params.step_cache)
        request = _Request(request_id, deadline=time.perf_counter() + timeout_s)
        self._check(request)

        used_embeds: dict[str, torch.Tensor] | None = None
        self._local.request = request
        try:
            if latents is not None:
                final = self._given_latents(latents, params)
            else:
                start = time.perf_counter()
                if embeds is None:
                    used_embeds = self._encode(base, prompt, params.negative_prompt)
                else:
                    used_embeds = self._given_embeds(base, embeds, params.negative_prompt)
                request.encode_s = time.perf_counter() - start
                final = self._denoise(base, request, used_embeds, params, init_image, mode_params)
            self._check(request)
            start = time.perf_counter()
            image = self._decode(base, final)
            request.decode_s = time.perf_counter() - start
        except (RequestTimeoutError, EngineStoppedError, RequestValidationError):
            raise
        except Exception as exc:
            raise ProcessingError(f"{request_id}: diffusion failed: {exc}") from exc
        finally:
            self._local.request = None
        return ImageOutput(
            image=image,
            steps_run=request.steps_run,
            timings=_timings(request),
            denoise_steps=request.denoise_steps,
            embeds=used_embeds,
            latents=final,
        )

    def encode_prompt(
        self, prompt: str, negative_prompt: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The prompt embeddings `generate(..., embeds=)` takes, on the engine's device.

        They depend on the checkpoint, the prompt, the negative prompt (encoded only when
        true CFG applies: non-empty and `true_cfg_scale` > 1) and `max_sequence_length`.
        """
        return self._encode(self._live_base("encode"), prompt, negative_prompt)

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
        request = _Request("calibrate", deadline=time.perf_counter() + timeout_s)
        self._acquire(request)
        try:
            return list(self._mag_ratios_locked(base, request, steps, width, height))
        finally:
            self._denoise_lock.release()

    @property
    def mag_ratios(self) -> dict[tuple[int, int, int], list[float]]:
        """The calibrated MagCache ratios by (steps, width, height) (a copy)."""
        return {key: list(ratios) for key, ratios in self._mag_ratios.items()}

    def shutdown(self) -> None:
        """Stop in-flight requests at their next step; later calls raise EngineStoppedError.

        The modules are freed once the in-flight requests, which hold references, return.
        """
        self._stopped.set()
        self._base = None

    # --- phases -------------------------------------------------------------------------------

    def _encode(
        self, base: FluxPipeline, prompt: str, negative_prompt: str | None
    ) -> dict[str, torch.Tensor]:
        """What `FluxPipeline.__call__` does for its prompts, with the same arguments."""
        embeds = dict(zip(EMBED_KEYS, self._encode_text(base, prompt), strict=True))
        if self._true_cfg(negative_prompt):
            negative = self._encode_text(base, negative_prompt or "")
            embeds.update(zip(NEGATIVE_EMBED_KEYS, negative, strict=True))
        return embeds

    def _encode_text(self, base: FluxPipeline, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 sequence and CLIP pooled embeddings of one prompt."""
        import torch

        with self._encode_lock, torch.no_grad():
            sequence, pooled, _ = base.encode_prompt(
                prompt=text,
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
        return sequence, pooled

    def _given_embeds(
        self, base: FluxPipeline, embeds: Mapping[str, torch.Tensor], negative_prompt: str | None
    ) -> dict[str, torch.Tensor]:
        """Checked and moved to the device; the negative ones encoded if missing."""
        import torch

        true_cfg = self._true_cfg(negative_prompt)
        have_negative = all(embeds.get(key) is not None for key in NEGATIVE_EMBED_KEYS)
        keys = EMBED_KEYS + NEGATIVE_EMBED_KEYS if true_cfg and have_negative else EMBED_KEYS
        used: dict[str, torch.Tensor] = {}
        for key in keys:
            value = embeds.get(key)
            if not isinstance(value, torch.Tensor):
                raise RequestValidationError("embeds", f"needs a tensor {key!r}")
            want_dims = 2 if "pooled" in key else 3
            if value.dim() != want_dims or value.shape[0] != 1:
                raise RequestValidationError(
                    "embeds", f"{key!r} has shape {tuple(value.shape)}, not one prompt's"
                )
            used[key] = value.to(self.device)
        if true_cfg and not have_negative:
            negative = self._encode_text(base, negative_prompt or "")
            used.update(zip(NEGATIVE_EMBED_KEYS, negative, strict=True))
        return used

    def _denoise(
        self,
        base: FluxPipeline,
        request: _Request,
        embeds: dict[str, torch.Tensor],
        params: ImageParams,
        init_image: Image.Image | None,
        mode_params: dict[str, float | int],
    ) -> torch.Tensor:
        """The pipeline call, under the transformer lock; returns unpacked latents."""
        import torch
        from diffusers import FluxPipeline

        img2img = init_image is not None
        pipe = self._pipeline(base, img2img=img2img)
        kwargs: dict[str, Any] = {
            "prompt_embeds": embeds["prompt_embeds"],
            "pooled_prompt_embeds": embeds["pooled_prompt_embeds"],
            "width": params.width,
            "height": params.height,
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance,
            "generator": torch.Generator(device=self.device).manual_seed(params.seed),
            "max_sequence_length": self.max_sequence_length,
            "callback_on_step_end": self._make_step_callback(request),
            "output_type": "latent",
        }
        true_cfg = NEGATIVE_EMBED_KEYS[0] in embeds
        if true_cfg:
            kwargs["negative_prompt_embeds"] = embeds["negative_prompt_embeds"]
            kwargs["negative_pooled_prompt_embeds"] = embeds["negative_pooled_prompt_embeds"]
            kwargs["true_cfg_scale"] = self.true_cfg_scale
        if init_image is not None:
            kwargs["image"] = init_image.convert("RGB").resize((params.width, params.height))
            kwargs["strength"] = params.strength
        num_steps = _steps_taken(params, img2img)
        mode = params.step_cache.mode
        request.needs_cache_context = img2img and mode in step_cache.DIFFUSERS_MODES

        self._acquire(request)
        try:
            ratios = None
            if mode == "magcache":
                full = self._mag_ratios_locked(
                    base, request, params.steps, params.width, params.height
                )
                ratios = step_cache.magcache_ratios_for(full, params.steps, num_steps)
            request.pipe_start = time.perf_counter()
            with step_cache.applied(
                pipe,
                mode,
                mode_params,
                num_steps=num_steps,
                true_cfg=true_cfg,
                mag_ratios=ratios,
                current_timestep=(lambda: request.timestep) if img2img else None,
            ):
                packed = pipe(**kwargs).images
        finally:
            self._denoise_lock.release()
        return FluxPipeline._unpack_latents(
            packed, params.height, params.width, pipe.vae_scale_factor
        )

    def _decode(self, base: FluxPipeline, latents: torch.Tensor) -> Image.Image:
        """`FluxPipeline.__call__`'s decode of unpacked latents, step by step."""
        import torch
        from diffusers.utils.torch_utils import get_module_execution_device

        vae = base.vae
        with torch.no_grad():
            latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
            latents = latents.to(get_module_execution_device(vae))
            image = vae.decode(latents, return_dict=False)[0]
            return base.image_processor.postprocess(image, output_type="pil")[0]

    def _given_latents(self, latents: torch.Tensor, params: ImageParams) -> torch.Tensor:
        import torch

        scale = self.size_multiple // 2  # the VAE's downsampling
        want = (1, self.latent_channels, params.height // scale, params.width // scale)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != want:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents)
            raise RequestValidationError(
                "latents", f"need a tensor of shape {want} for this request, got {got}"
            )
        return latents.to(self.device)

    # --- MagCache calibration -----------------------------------------------------------------

    def _mag_ratios_locked(
        self, base: FluxPipeline, request: _Request, steps: int, width: int, height: int
    ) -> list[float]:
        """Calibrated ratios of the full schedule; calibrates now if needed (lock held)."""
        key = (steps, width, height)
        ratios = self._mag_ratios.get(key)
        if ratios is None:
            start = time.perf_counter()
            ratios = self._calibrate_locked(base, request, steps, width, height)
            request.calibrate_s = time.perf_counter() - start
            self._mag_ratios[key] = ratios
        return ratios

    def _calibrate_locked(
        self, base: FluxPipeline, request: _Request, steps: int, width: int, height: int
    ) -> list[float]:
        """diffusers' MagCache calibration: one uncached run with fixed inputs."""
        import torch

        pipe = self._pipeline(base, img2img=False)
        embeds = self._encode(base, MAGCACHE_CALIBRATION_PROMPT, None)

        def check(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            self._check(request)
            return tensors

        outer = getattr(self._local, "request", None)
        self._local.request = None  # the hooks must not count these steps for the request
        transformer = pipe.transformer
        try:
            step_cache.enable_diffusers_cache(
                transformer, step_cache.magcache_calibration_config(steps)
            )
            try:
                ratios = step_cache.record_magcache_ratios(transformer)
                pipe(
                    prompt_embeds=embeds["prompt_embeds"],
                    pooled_prompt_embeds=embeds["pooled_prompt_embeds"],
                    width=width,
                    height=height,
                    num_inference_steps=steps,
                    guidance_scale=MAGCACHE_CALIBRATION_GUIDANCE,
                    generator=torch.Generator(device=self.device).manual_seed(
                        MAGCACHE_CALIBRATION_SEED
                    ),
                    max_sequence_length=self.max_sequence_length,
                    callback_on_step_end=check,
                    output_type="latent",
                )
            finally:
                step_cache.disable_diffusers_cache(transformer)
        finally:
            self._local.request = outer
        if len(ratios) != steps:
            raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {steps} steps")
        return ratios

    # --- plumbing -----------------------------------------------------------------------------

    def _live_base(self, request_id: str) -> FluxPipeline:
        base = self._base
        if base is None or self._stopped.is_set():
            raise EngineStoppedError(f"{request_id}: diffusion engine is shut down")
        return base

    def _true_cfg(self, negative_prompt: str | None) -> bool:
        return bool(negative_prompt) and self.true_cfg_scale > 1

    def _acquire(self, request: _Request) -> None:
        """Take the transformer lock, giving up on timeout or shutdown."""
        while not self._denoise_lock.acquire(timeout=_LOCK_POLL_S):
            self._check(request)
        try:
            self._check(request)
        except BaseException:
            self._denoise_lock.release()
            raise

    def _pipeline(self, base: FluxPipeline, *, img2img: bool) -> FluxPipeline:
        """A per-request pipeline object sharing `base`'s modules, with its own scheduler.

        Built with the constructor, not `from_pipe`: `from_pipe` without `torch_dtype` casts
        the shared modules to float32 (it calls `.to(dtype)` on them).
        """
        from diffusers import FluxImg2ImgPipeline, FluxPipeline

        components = dict(base.components)
        components["scheduler"] = base.scheduler.from_config(base.scheduler.config)
        pipe = (FluxImg2ImgPipeline if img2img else FluxPipeline)(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _check(self, request: _Request) -> None:
        if self._stopped.is_set():
            raise EngineStoppedError(f"{request.request_id}: diffusion engine shut down")
        if time.perf_counter() > request.deadline:
            raise RequestTimeoutError(
                f"{request.request_id}: timed out after {request.denoise_steps} denoising steps"
            )

    def _before_transformer(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        """Forward pre-hook on the shared transformer; a no-op outside `generate`."""
        request: _Request | None = getattr(self._local, "request", None)
        if request is None:
            return
        request.blocks_in_call = 0
        if request.denoise_start is None:  # preparation done: check before the first step too
            request.denoise_start = time.perf_counter()
            self._check(request)
        if request.needs_cache_context:
            timestep = kwargs.get("timestep")  # the pipelines pass t / 1000
            if timestep is not None:
                request.timestep = float(timestep.flatten()[0]) * 1000
            name = "cond" if request.calls_in_step == 0 else "uncond"
            request.open_context = module.cache_context(name)
            request.open_context.__enter__()
        request.calls_in_step += 1

    def _block_ran(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        request: _Request | None = getattr(self._local, "request", None)
        if request is not None:
            request.blocks_in_call += 1

    def _after_transformer(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        request: _Request | None = getattr(self._local, "request", None)
        if request is None:
            return
        if request.blocks_in_call >= self._num_blocks:
            request.full_call = True
        if request.open_context is not None:
            context, request.open_context = request.open_context, None
            context.__exit__(None, None, None)

    def _make_step_callback(self, request: _Request) -> Any:
        def on_step_end(
            pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            request.denoise_steps += 1
            if request.full_call:
                request.steps_run += 1
            request.full_call = False
            request.calls_in_step = 0
            request.last_step_end = time.perf_counter()
            self._check(request)
            return tensors

        return on_step_end


def _block_marker(block: Any) -> Any:
    """A submodule that runs on every run of `block` (Flux: `proj_out` / `ff`)."""
    for name in ("proj_out", "ff"):
        marker = getattr(block, name, None)
        if marker is not None:
            return marker
    raise ConfigError("model", f"unsupported transformer block {type(block).__name__}")


def _steps_taken(params: ImageParams, img2img: bool) -> int:
    """Denoising steps the pipeline will run (`FluxImg2ImgPipeline.get_timesteps`)."""
    if not img2img:
        return params.steps
    init_timestep = min(params.steps * params.strength, params.steps)
    t_start = int(max(params.steps - init_timestep, 0))
    return params.steps - t_start


def _timings(request: _Request) -> dict[str, float]:
    """encode_s: text encoders, plus the pipeline's preparation up to the first transformer
    call (latents, timesteps, the init image's VAE encode); denoise_s: first transformer
    call to the end of the last step; decode_s: the VAE decode and postprocessing; 0 for a
    skipped phase. The rest of total_s is mostly waiting for the shared transformer.
    calibrate_s only when the request had to calibrate MagCache first."""
    end = time.perf_counter()
    encode_s = request.encode_s
    denoise_s = 0.0
    if request.pipe_start is not None and request.denoise_start is not None:
        encode_s += request.denoise_start - request.pipe_start
        if request.last_step_end is not None:
            denoise_s = request.last_step_end - request.denoise_start
    timings = {
        "total_s": end - request.started,
        "encode_s": encode_s,
        "denoise_s": denoise_s,
        "decode_s": request.decode_s,
    }
    if request.calibrate_s is not None:
        timings["calibrate_s"] = request.calibrate_s
    return {k: round(v, 6) for k, v in timings.items()}
