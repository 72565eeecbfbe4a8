"""Loading and the three phases of a Flux request, each as `FluxPipeline.__call__` does it.

Encode and decode mirror the pipeline's own code step by step, so that a request resumed from
returned embeddings or latents gives the same pixels as one that ran every phase. The denoise
phase is the pipeline call itself with `prompt_embeds=...` and `output_type="latent"`; this
module builds its arguments and the per-request pipeline object, the engine runs it.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from omni_tasks.errors import RequestValidationError
from workers.engines.base import ImageParams
from workers.engines.coalescer import Coalescer
from workers.engines.flux.hooks import StepCallback

if TYPE_CHECKING:
    import torch
    from diffusers import FluxPipeline
    from PIL import Image

EMBED_KEYS = ("prompt_embeds", "pooled_prompt_embeds")
NEGATIVE_EMBED_KEYS = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")


def load_pipeline(model: str, dtype: torch.dtype, device: torch.device) -> FluxPipeline:
    """The shared pipeline, on `device`, in eval mode, without progress bars."""
    import torch
    from diffusers import FluxPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Loading bars are process-wide settings; a worker logs, it has no terminal.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype to dtype
        warnings.simplefilter("ignore", FutureWarning)
        pipe = FluxPipeline.from_pretrained(model, torch_dtype=dtype)
    pipe.to(device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # from_pretrained does this; be explicit (dropout off)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def request_pipeline(base: FluxPipeline, *, img2img: bool, transformer: Any = None) -> FluxPipeline:
    """A per-request pipeline object sharing `base`'s modules, with its own scheduler.

    Built with the constructor, not `from_pipe`: `from_pipe` without `torch_dtype` casts
    the shared modules to float32 (it calls `.to(dtype)` on them). `transformer`: what
    the pipeline calls instead of the shared transformer (the step loop's stand-in); set
    past the pipeline's config bookkeeping, which only records real modules.
    """
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    components = dict(base.components)
    components["scheduler"] = base.scheduler.from_config(base.scheduler.config)
    pipe = (FluxImg2ImgPipeline if img2img else FluxPipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    if transformer is not None:
        object.__setattr__(pipe, "transformer", transformer)
    return pipe


def steps_taken(params: ImageParams, img2img: bool) -> int:
    """Denoising steps the pipeline will run (`FluxImg2ImgPipeline.get_timesteps`)."""
    if not img2img:
        return params.steps
    init_timestep = min(params.steps * params.strength, params.steps)
    t_start = int(max(params.steps - init_timestep, 0))
    return params.steps - t_start


def unpack(packed: torch.Tensor, params: ImageParams, pipe: FluxPipeline) -> torch.Tensor:
    """The denoise call's packed latents as (1, channels, height / 8, width / 8)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, params.height, params.width, pipe.vae_scale_factor)


def decode(base: FluxPipeline, latents: torch.Tensor) -> Image.Image:
    """`FluxPipeline.__call__`'s decode of unpacked latents, step by step."""
    import torch
    from diffusers.utils.torch_utils import get_module_execution_device

    vae = base.vae
    with torch.no_grad():
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        latents = latents.to(get_module_execution_device(vae))
        image = vae.decode(latents, return_dict=False)[0]
        return base.image_processor.postprocess(image, output_type="pil")[0]


def given_latents(
    latents: torch.Tensor, want: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Latents a caller passed, checked against the request's shape `want`, on `device`."""
    import torch

    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != want:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents)
        raise RequestValidationError(
            "latents", f"need a tensor of shape {want} for this request, got {got}"
        )
    return latents.to(device)


class PromptEncoder:
    """The text encoders' phase, and the pipeline arguments that carry its embeddings."""

    def __init__(
        self,
        device: torch.device,
        max_sequence_length: int,
        true_cfg_scale: float,
        run_on: Callable[[Callable[[], Any]], Any] | None = None,
    ) -> None:
        """`run_on`: runs an encoder call on the thread that drives the device (the
        engine's step loop); by default the calling thread."""
        self.device = device
        self._run_on = run_on or (lambda fn: fn())
        self.max_sequence_length = max_sequence_length
        self.true_cfg_scale = true_cfg_scale
        # Prompts of requests arriving together are encoded as one batch; one call at a
        # time, which fast tokenizers need (they are not thread-safe).
        self._texts: Coalescer[tuple[FluxPipeline, str], tuple[torch.Tensor, torch.Tensor]]
        self._texts = Coalescer(lambda items: self._run_on(lambda: self._encode_texts(items)))
        self._lock = threading.Lock()  # urgent calls run beside the batches

    def scale(self, true_cfg_scale: float | None) -> float:
        """A request's true CFG scale: its own, else the engine's."""
        return self.true_cfg_scale if true_cfg_scale is None else true_cfg_scale

    def true_cfg(self, negative_prompt: str | None, true_cfg_scale: float | None = None) -> bool:
        return bool(negative_prompt) and self.scale(true_cfg_scale) > 1

    def encode(
        self,
        base: FluxPipeline,
        prompt: str,
        negative_prompt: str | None,
        urgent: bool = False,
        true_cfg_scale: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """What `FluxPipeline.__call__` does for its prompts, with the same arguments.
        `urgent`: encode in the calling thread now, rather than with the next batch of
        prompts on the device's thread (which waits for the step in progress)."""
        embeds = dict(zip(EMBED_KEYS, self._encode_text(base, prompt, urgent), strict=True))
        if self.true_cfg(negative_prompt, true_cfg_scale):
            negative = self._encode_text(base, negative_prompt or "", urgent)
            embeds.update(zip(NEGATIVE_EMBED_KEYS, negative, strict=True))
        return embeds

    def given_embeds(
        self,
        base: FluxPipeline,
        embeds: Mapping[str, torch.Tensor],
        negative_prompt: str | None,
        true_cfg_scale: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Checked and moved to the device; the negative ones encoded if missing."""
        import torch

        true_cfg = self.true_cfg(negative_prompt, true_cfg_scale)
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

    def denoise_kwargs(
        self,
        embeds: dict[str, torch.Tensor],
        params: ImageParams,
        init_image: Image.Image | None,
        callback: StepCallback | None,
    ) -> dict[str, Any]:
        """The denoise call's arguments; true CFG when `embeds` has the negative ones."""
        import torch

        kwargs: dict[str, Any] = {
            "prompt_embeds": embeds["prompt_embeds"],
            "pooled_prompt_embeds": embeds["pooled_prompt_embeds"],
            "width": params.width,
            "height": params.height,
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance,
            "generator": torch.Generator(device=self.device).manual_seed(params.seed),
            "max_sequence_length": self.max_sequence_length,
            "callback_on_step_end": callback,
            "output_type": "latent",
        }
        if NEGATIVE_EMBED_KEYS[0] in embeds:
            kwargs["negative_prompt_embeds"] = embeds["negative_prompt_embeds"]
            kwargs["negative_pooled_prompt_embeds"] = embeds["negative_pooled_prompt_embeds"]
            kwargs["true_cfg_scale"] = self.scale(params.true_cfg_scale)
        if init_image is not None:
            kwargs["image"] = init_image.convert("RGB").resize((params.width, params.height))
            kwargs["strength"] = params.strength
        return kwargs

    def _encode_text(
        self, base: FluxPipeline, text: str, urgent: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 sequence and CLIP pooled embeddings of one prompt."""
        if urgent:
            return self._encode_texts([(base, text)])[0]
        return self._texts((base, text))  # type: ignore[no-any-return]

    def _encode_texts(
        self, items: list[tuple[FluxPipeline, str]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One encoder call for several prompts. Both encoders pad every prompt to a fixed
        length, so a prompt's rows are computed as they would be alone."""
        import torch

        base = items[0][0]
        assert all(b is base for b, _ in items), "one engine, one pipeline"
        with self._lock, torch.no_grad():
            sequence, pooled, _ = base.encode_prompt(
                prompt=[text for _, text in items],
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
        # Own copies: a cached row must not keep the whole batch's storage alive.
        return [(sequence[i : i + 1].clone(), pooled[i : i + 1].clone()) for i in range(len(items))]
