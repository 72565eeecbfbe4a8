"""The fallback for a diffusers pipeline with no family module: it runs as it is.

The pipeline is called with the prompt text and `output_type="pil"`, its transformer
replaced by the step loop's stand-in, so priority, preemption, deadlines, cancellation
and progress hold as for every family. Nothing is known of its text encoders or its
latents, so there is no embedding reuse, no previews, and the "latents" the DiT cache
keeps for an exact repeat are the final image's pixels.

Whether its transformer calls can share a step is checked when the model loads
(`check_rows`): one short run records two of its calls, which then run stacked, and
must give each call's rows as alone. Arguments whose first axis is the call's batch are
its rows, the rest is shared. If the check fails, every request runs alone (its batch
key is None) and the log says so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from workers.engines.base import ImageParams
from workers.engines.families.base import Embeds, ModelFamily

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)
#: How far a stacked call's rows may be from the rows alone (float rounding).
ROW_TOLERANCE = 1e-4


class GenericFamily(ModelFamily):
    name = "generic"
    embed_keys = ()
    output_type = "pil"
    previews = False
    batched: ClassVar[bool] = False  # set by `check_rows`

    def __init__(self, pipe: Any, device: torch.device, max_sequence_length: int) -> None:
        super().__init__(pipe, device, max_sequence_length)
        # The pipeline encodes its prompts inside each request's call, in many threads at
        # once: fast tokenizers are not thread-safe, so each runs under a lock.
        for name, component in pipe.components.items():
            if name.startswith("tokenizer") and component is not None:
                object.__setattr__(pipe, name, _LockedTokenizer(component))

    @classmethod
    def for_pipeline(cls, class_name: str) -> type[GenericFamily]:
        """A family for diffusers pipeline `class_name`."""
        return type(f"Generic{class_name}", (cls,), {"pipeline": class_name})

    def encode(
        self, prompts: Sequence[str], images: Sequence[Any] | None = None, negative: bool = False
    ) -> list[Embeds]:
        return [{} for _ in prompts]

    def check_embeds(self, embeds: Any, name: str = "embeds") -> Embeds:
        return {}

    def negative_text(self, params: ImageParams, true_cfg_scale: float) -> str | None:
        return None  # the pipeline encodes the negative prompt itself

    def pipeline_kwargs(
        self,
        embeds: Embeds,
        negative: Embeds | None,
        params: ImageParams,
        true_cfg_scale: float,
        image: Image.Image | None,
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"guidance_scale": params.guidance}
        if params.negative_prompt:
            kwargs["negative_prompt"] = params.negative_prompt
        return kwargs

    def text_kwargs(self, prompt: str) -> dict[str, Any]:
        return {"prompt": prompt}

    def batch_key(
        self, params: ImageParams, embeds: Embeds, image: Image.Image | None = None
    ) -> Any:
        return (self.name, params.width, params.height) if self.batched else None

    def latent_shape(self, params: ImageParams) -> tuple[int, ...]:
        return (1, 3, params.height, params.width)

    def probe_inputs(
        self, rows: int, params: ImageParams, opts: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The first transformer call of a run of `params`' size, stacked `rows` times
        (recorded once per size: the pipeline runs up to that call)."""
        if not self.batched:
            return None
        from workers.engines.diffusion.batching import stacked_inputs

        return stacked_inputs(self, [first_call(self, params.width, params.height)] * rows)

    def unpack(self, latents: Any, params: ImageParams) -> torch.Tensor:
        """The pipeline's images as a (1, 3, height, width) uint8 tensor."""
        import numpy as np
        import torch

        array = np.asarray(latents[0].convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)

    def decode(self, latents: torch.Tensor) -> Image.Image:
        from PIL import Image

        return Image.fromarray(latents[0].permute(1, 2, 0).cpu().numpy())


def check_rows(family: GenericFamily) -> bool:
    """Whether the family's transformer calls may share a step (module docstring); sets
    its `row_inputs`, `list_rows` and `batched`. Runs the pipeline once, 2 steps."""
    import torch

    from workers.engines.diffusion.phases import request_pipeline

    real = family.pipe.transformer
    recorder = _Recorder(real)
    pipe = request_pipeline(family.pipe, family.pipeline_class(), transformer=recorder)
    side = family.size_multiple * 2
    try:
        with torch.no_grad():
            pipe(prompt="a test", width=side, height=side, num_inference_steps=2)
        family.batched = _rows_match(family, real, recorder.calls[0], recorder.calls[-1])
    except Exception as exc:  # noqa: BLE001 - any failure means: run alone
        log.info("%s: row check failed (%s)", family.pipeline, exc)
        family.batched = False
    how = "shares denoising steps" if family.batched else "runs request by request"
    log.info("%s has no family module: it %s (generic family)", family.pipeline, how)
    return family.batched


class _LockedTokenizer:
    """A tokenizer whose calls run one at a time."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._tokenizer, name)
        if not callable(value):
            return value

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return value(*args, **kwargs)

        return locked

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._tokenizer(*args, **kwargs)


class _Captured(Exception):
    """Ends a recording run at the first transformer call."""


def first_call(family: GenericFamily, width: int, height: int) -> dict[str, Any]:
    """The arguments of the first transformer call of a `width` x `height` run."""
    import torch

    from workers.engines.diffusion.phases import request_pipeline

    recorder = _Recorder(family.pipe.transformer, stop=True)
    pipe = request_pipeline(family.pipe, family.pipeline_class(), transformer=recorder)
    try:
        with torch.no_grad():
            pipe(prompt="a test", width=width, height=height, num_inference_steps=1)
    except _Captured:
        pass
    return recorder.calls[0]


class _Recorder:
    """Stands in for the transformer and keeps each call's keyword arguments (`stop`:
    raise `_Captured` at the first call instead of running it)."""

    def __init__(self, transformer: Any, stop: bool = False) -> None:
        self._transformer = transformer
        self._stop = stop
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transformer, name)

    def cache_context(self, name: str) -> Any:
        from contextlib import nullcontext

        return nullcontext()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import inspect

        names = list(inspect.signature(self._transformer.forward).parameters)
        kwargs.update(zip(names, args, strict=False))
        self.calls.append(dict(kwargs))
        if self._stop:
            raise _Captured
        return self._transformer(**kwargs)


def _rows_match(family: GenericFamily, real: Any, a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Split the arguments into rows and shared ones; run `a` and `b` stacked and alone."""
    import torch

    rows = int(a["hidden_states"].shape[0])
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor) and v.dim() > 0]
    family.row_inputs = tuple(k for k in tensors if a[k].shape[0] == rows)
    family.list_rows = tuple(k for k, v in a.items() if isinstance(v, list) and len(v) == rows)
    for key, value in a.items():
        if key in family.row_inputs or key in family.list_rows or key == "return_dict":
            continue
        other = b.get(key)
        same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
        if not same:
            return False  # shared by one request's calls only: not by a batch
    from workers.engines.diffusion.batching import stacked_inputs

    with torch.no_grad():
        both = real(**stacked_inputs(family, [a, b]))[0]
        alone = [real(**{**call, "return_dict": False})[0] for call in (a, b)]
    expected = torch.cat(alone, dim=0)
    return bool(torch.allclose(both, expected, atol=ROW_TOLERANCE, rtol=ROW_TOLERANCE))
