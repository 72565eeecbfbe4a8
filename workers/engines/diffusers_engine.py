"""A Flux text-to-image / img2img engine on diffusers, shared by the threads of one worker.

One shared pipeline object cannot serve two threads at once (its scheduler keeps the step
index), so every request gets its own light pipeline object built around the shared, loaded
modules with a fresh scheduler. The modules are stateless in eval mode, so concurrent
requests give the same pixels as sequential ones.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omni_tasks.errors import (
    ConfigError,
    EngineStoppedError,
    ProcessingError,
    RequestTimeoutError,
    RequestValidationError,
)
from workers.engines.base import ImageOutput, ImageParams

if TYPE_CHECKING:
    import torch
    from diffusers import FluxPipeline
    from PIL import Image

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_DTYPES.update(fp32="float32", bf16="bfloat16", fp16="float16")


@dataclass
class _Request:
    """Per-request state, reached from the transformer hook through a thread-local."""

    request_id: str
    deadline: float
    started: float = field(default_factory=time.perf_counter)
    denoise_start: float | None = None
    last_step_end: float | None = None
    steps_run: int = 0


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
    ) -> None:
        """`true_cfg_scale` applies only to requests with a negative prompt (true CFG
        doubles the transformer calls); `max_sequence_length` is the T5 prompt length."""
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
        pipe.transformer.register_forward_pre_hook(self._before_transformer)
        self._base: FluxPipeline | None = pipe
        # Latent 2x2 packing after the VAE's downsampling: sizes must be multiples of this.
        self.size_multiple: int = pipe.vae_scale_factor * 2

    def generate(
        self,
        request_id: str,
        prompt: str,
        params: ImageParams,
        timeout_s: float,
        init_image: Image.Image | None = None,
    ) -> ImageOutput:
        """Text-to-image, or img2img from `init_image` (resized to width x height).

        Raises RequestTimeoutError once `timeout_s` has passed and EngineStoppedError after
        `shutdown()`, both checked before the first step and after every step.
        """
        import torch

        base = self._base
        if base is None or self._stopped.is_set():
            raise EngineStoppedError(f"{request_id}: diffusion engine is shut down")
        for name in ("width", "height"):
            if getattr(params, name) % self.size_multiple:
                raise RequestValidationError(
                    name, f"must be a multiple of {self.size_multiple} for this model"
                )
        request = _Request(request_id, deadline=time.perf_counter() + timeout_s)
        self._check(request)

        pipe = self._pipeline(base, img2img=init_image is not None)
        kwargs: dict[str, Any] = {
            "prompt": prompt,
            "width": params.width,
            "height": params.height,
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance,
            "generator": torch.Generator(device=self.device).manual_seed(params.seed),
            "max_sequence_length": self.max_sequence_length,
            "callback_on_step_end": self._make_step_callback(request),
        }
        if params.negative_prompt:
            kwargs["negative_prompt"] = params.negative_prompt
            kwargs["true_cfg_scale"] = self.true_cfg_scale
        if init_image is not None:
            kwargs["image"] = init_image.convert("RGB").resize((params.width, params.height))
            kwargs["strength"] = params.strength

        self._local.request = request
        try:
            image = pipe(**kwargs).images[0]
        except (RequestTimeoutError, EngineStoppedError):
            raise
        except Exception as exc:
            raise ProcessingError(f"{request_id}: diffusion failed: {exc}") from exc
        finally:
            self._local.request = None
        return ImageOutput(image=image, steps_run=request.steps_run, timings=_timings(request))

    def shutdown(self) -> None:
        """Stop in-flight requests at their next step; later calls raise EngineStoppedError.

        The modules are freed once the in-flight requests, which hold references, return.
        """
        self._stopped.set()
        self._base = None

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
                f"{request.request_id}: timed out after {request.steps_run} denoising steps"
            )

    def _before_transformer(self, module: torch.nn.Module, args: Any) -> None:
        """Forward pre-hook on the shared transformer; a no-op outside `generate`."""
        request: _Request | None = getattr(self._local, "request", None)
        if request is None:
            return
        if request.denoise_start is None:  # encoding done: check before the first step too
            request.denoise_start = time.perf_counter()
            self._check(request)

    def _make_step_callback(self, request: _Request) -> Any:
        def on_step_end(
            pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            request.steps_run += 1
            request.last_step_end = time.perf_counter()
            self._check(request)
            return tensors

        return on_step_end


def _timings(request: _Request) -> dict[str, float]:
    """encode_s: prompt (and init image) encoding up to the first transformer call."""
    end = time.perf_counter()
    timings = {"total_s": end - request.started}
    if request.denoise_start is not None and request.last_step_end is not None:
        timings["encode_s"] = request.denoise_start - request.started
        timings["denoise_s"] = request.last_step_end - request.denoise_start
        timings["decode_s"] = end - request.last_step_end
    return {k: round(v, 6) for k, v in timings.items()}
