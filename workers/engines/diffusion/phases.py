"""Loading, and the encode phase of a request, for any model family.

Encode runs the family's text encoders (`ModelFamily.encode`) for the prompts of requests
arriving together as one call, on the device's thread; each prompt's rows are what it
would get alone, so a request resumed from returned embeddings gives the same pixels as
one that encoded. The denoise phase is the family's pipeline call with those embeddings
and `output_type="latent"`; this module builds its arguments and the per-request
pipeline object, the engine runs it.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from omni_tasks.errors import ConfigError, RequestValidationError
from workers.device_thread import RunOnDevice, run_here
from workers.engines.base import ImageParams
from workers.engines.coalescer import Coalescer
from workers.engines.diffusion.hooks import StepCallback

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from workers.engines.families.base import Embeds, ModelFamily

#: The prefix of a negative prompt's embeddings in `ImageOutput.embeds`.
NEGATIVE = "negative_"
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_DTYPES.update(fp32="float32", bf16="bfloat16", fp16="float16")


def device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
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


def load_pipeline(
    pipeline_class: Any,
    model: str,
    dtype: torch.dtype,
    device: torch.device,
    extra: dict[str, Any] | None = None,
) -> Any:
    """The shared pipeline, on `device`, in eval mode, without progress bars; `extra`:
    more `from_pretrained` arguments (components the family loads itself)."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Loading bars are process-wide settings; a worker logs, it has no terminal.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype to dtype
        warnings.simplefilter("ignore", FutureWarning)
        pipe = pipeline_class.from_pretrained(model, torch_dtype=dtype, **(extra or {}))
    pipe.to(device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # from_pretrained does this; be explicit (dropout off)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def request_pipeline(base: Any, pipeline_class: Any, transformer: Any = None) -> Any:
    """A per-request pipeline object of `pipeline_class` sharing `base`'s modules, with its
    own scheduler (a shared one keeps the step index of whichever request ran last).

    Built with the constructor (with the checkpoint's registered plain settings), not
    `from_pipe`: `from_pipe` without `torch_dtype` casts
    the shared modules to float32 (it calls `.to(dtype)` on them). `transformer`: what
    the pipeline calls instead of the shared transformer (the step loop's stand-in); set
    past the pipeline's config bookkeeping, which only records real modules.
    """
    import inspect

    accepted = inspect.signature(pipeline_class.__init__).parameters
    components = {k: v for k, v in base.components.items() if k in accepted}
    # Plain settings the checkpoint registered (Wan 2.2's `expand_timesteps`), kept.
    components.update(
        (k, v)
        for k, v in base.config.items()
        if k in accepted and k not in components and not isinstance(v, (list, tuple))
    )
    components["scheduler"] = base.scheduler.from_config(base.scheduler.config)
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    if transformer is not None:
        object.__setattr__(pipe, "transformer", transformer)
    return pipe


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


def split_embeds(embeds: Mapping[str, torch.Tensor]) -> tuple[Embeds, Embeds | None]:
    """`ImageOutput.embeds` as (the prompt's, the negative prompt's or None)."""
    positive = {k: v for k, v in embeds.items() if not k.startswith(NEGATIVE)}
    negative = {k[len(NEGATIVE) :]: v for k, v in embeds.items() if k.startswith(NEGATIVE)}
    return positive, negative or None


def joined_embeds(positive: Embeds, negative: Embeds | None) -> Embeds:
    """The inverse of `split_embeds`."""
    joined = dict(positive)
    for key, value in (negative or {}).items():
        joined[NEGATIVE + key] = value
    return joined


class PromptEncoder:
    """The text encoders' phase of one engine, and the pipeline arguments that carry it."""

    def __init__(
        self,
        family: ModelFamily,
        true_cfg_scale: float,
        run_on: RunOnDevice = run_here,
    ) -> None:
        """`run_on`: runs an encoder call on the thread that drives the device (the
        engine's step loop); by default the calling thread."""
        self.family = family
        self.device = family.device
        self._run_on = run_on
        self.true_cfg_scale = true_cfg_scale
        # Prompts of requests arriving together are encoded as one batch; one call at a
        # time, which fast tokenizers need (they are not thread-safe).
        self._texts: Coalescer[tuple[str, Any, bool], Embeds]
        self._texts = Coalescer(lambda items: self._run_on(lambda: self._encode_texts(items)))
        self._lock = threading.Lock()  # urgent calls run beside the batches

    def scale(self, true_cfg_scale: float | None) -> float:
        """A request's true CFG scale: its own, else the engine's."""
        return self.true_cfg_scale if true_cfg_scale is None else true_cfg_scale

    def negative_text(self, params: ImageParams) -> str | None:
        return self.family.negative_text(params, self.scale(params.true_cfg_scale))

    def encode(
        self,
        prompt: str,
        params: ImageParams,
        image: Image.Image | None = None,
        urgent: bool = False,
    ) -> Embeds:
        """The request's embeddings, the negative prompt's under CFG (`NEGATIVE` keys).
        `urgent`: encode in the calling thread now, rather than with the next batch of
        prompts on the device's thread (which waits for the step in progress)."""
        condition = image if self.family.edit else None
        positive = self._encode_text(prompt, condition, False, urgent)
        negative_text = self.negative_text(params)
        negative = None
        if negative_text is not None:
            negative = self._encode_text(negative_text, condition, True, urgent)
        return joined_embeds(positive, negative)

    def given_embeds(
        self,
        embeds: Mapping[str, torch.Tensor],
        params: ImageParams,
        image: Image.Image | None = None,
    ) -> Embeds:
        """Checked and moved to the device; the negative ones encoded if CFG needs them
        and they are missing, dropped if it does not."""
        positive, negative = split_embeds(embeds)
        used = self.family.check_embeds(positive)
        negative_text = self.negative_text(params)
        if negative_text is None:
            return used
        if negative is not None:
            return joined_embeds(used, self.family.check_embeds(negative))
        condition = image if self.family.edit else None
        return joined_embeds(used, self._encode_text(negative_text, condition, True))

    def denoise_kwargs(
        self,
        embeds: Embeds,
        params: ImageParams,
        image: Image.Image | None,
        callback: StepCallback | None,
        prompt: str = "",
    ) -> dict[str, Any]:
        """The pipeline call's arguments; CFG when `embeds` has the negative ones."""
        import torch

        positive, negative = split_embeds(embeds)
        kwargs = self.family.pipeline_kwargs(
            positive, negative, params, self.scale(params.true_cfg_scale), image
        )
        kwargs.update(
            width=params.width,
            height=params.height,
            num_inference_steps=params.steps,
            generator=torch.Generator(device=self.device).manual_seed(params.seed),
            callback_on_step_end=callback,
            output_type=self.family.output_type,
        )
        kwargs.update(self.family.text_kwargs(prompt))
        return kwargs

    def _encode_text(
        self, text: str, image: Any = None, negative: bool = False, urgent: bool = False
    ) -> Embeds:
        if urgent:
            return self._encode_texts([(text, image, negative)])[0]
        return self._texts((text, image, negative))  # type: ignore[no-any-return]

    def _encode_texts(self, items: list[tuple[str, Any, bool]]) -> list[Embeds]:
        """One encoder call for the prompts, one for the negative prompts (with their
        images, for an edit family); results in the order of `items`."""
        out: dict[int, Embeds] = {}
        with self._lock:
            for negative in (False, True):
                group = [i for i, item in enumerate(items) if item[2] is negative]
                if not group:
                    continue
                texts = [items[i][0] for i in group]
                images = [items[i][1] for i in group] if self.family.edit else None
                rows = self.family.encode(texts, images, negative=negative)
                out.update(zip(group, rows, strict=True))
        return [out[i] for i in range(len(items))]
