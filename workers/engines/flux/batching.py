"""Batched denoising steps: the transformer calls of several Flux requests as one call.

A request's pipeline gets a `LoopTransformer` in place of the shared transformer: the
pipeline runs its own denoising loop (its timesteps, guidance, scheduler, img2img start
step, true CFG) and each of its transformer calls goes to the step loop, which stacks the
calls of one step into one forward pass (`run_batch`). Requests that share a step must
have the same image size (the same `img_ids`) and text length (`txt_ids`), and the same
LoRA adapter set unless per-row adapters are on (`workers.lora`); everything else is per
row. Each row's output is its own: the image does not depend on what it was
batched with beyond the float rounding of a larger matrix product.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from omni_tasks.errors import ProcessingError
from omni_tasks.lora import AdapterSet
from workers.engines.flux.hooks import Request, TransformerHooks
from workers.engines.flux.phases import request_pipeline
from workers.lora.flux import ADAPTERS_KEY
from workers.stepping.loop import StepLoop
from workers.stepping.request import ForwardCall, StepRequest

if TYPE_CHECKING:
    import torch

    from workers.lora.flux import FluxAdapters

# Per-row inputs, stacked along the batch; the rest must be equal across the batch.
_ROW_INPUTS = (
    "hidden_states",
    "timestep",
    "guidance",
    "pooled_projections",
    "encoder_hidden_states",
)
_SHARED_INPUTS = ("txt_ids", "img_ids")


def batch_key(
    width: int, height: int, text_length: int, adapters: AdapterSet | None = ()
) -> Hashable:
    """Requests with equal keys may share a denoising step: the same LoRA adapter set and
    scales too, unless `adapters` is None (rows with different sets may share a step)."""
    key = ("flux", width, height, text_length)
    return key if adapters is None else (*key, adapters)


class LoopTransformer:
    """Stands in for the shared transformer in one request's pipeline object."""

    def __init__(
        self, transformer: Any, loop: StepLoop, request: StepRequest, adapters: AdapterSet = ()
    ) -> None:
        self._transformer = transformer
        self._loop = loop
        self._request = request
        self._adapters = adapters
        self._calls_in_step = 0
        self.first_call_at: float | None = None

    def __getattr__(self, name: str) -> Any:  # config, dtype, device, encoder_hid_proj...
        return getattr(self._transformer, name)

    def cache_context(self, name: str) -> Any:
        """No step cache runs on a batched request (those run alone, on the real one)."""
        return nullcontext()

    def __call__(self, **kwargs: Any) -> tuple[torch.Tensor]:
        if kwargs.get("joint_attention_kwargs"):
            raise ProcessingError("joint_attention_kwargs cannot be batched")
        first = self._calls_in_step == 0
        self._calls_in_step += 1
        if self.first_call_at is None:
            self.first_call_at = time.perf_counter()
        kwargs[ADAPTERS_KEY] = self._adapters
        return self._loop.forward(self._request, kwargs, first_of_step=first)

    def step_ended(self) -> None:
        self._calls_in_step = 0


def run_batch(
    transformer: Any, calls: list[ForwardCall], adapters: FluxAdapters | None = None
) -> None:
    """One forward pass for `calls` (at most one per request); resolves each with its row.
    `adapters` applies each row's LoRA adapter set for the pass."""
    import torch

    payloads = [call.payload for call in calls]
    first = payloads[0]
    inputs: dict[str, Any] = {name: first[name] for name in _SHARED_INPUTS}
    for name in _ROW_INPUTS:
        rows = [p[name] for p in payloads]
        inputs[name] = None if rows[0] is None else torch.cat(rows, dim=0)
    sets = [p.get(ADAPTERS_KEY, ()) for p in payloads]
    try:
        lora = adapters.batch_rows(sets) if adapters is not None else nullcontext()
        with torch.no_grad(), lora:
            out = transformer(**inputs, joint_attention_kwargs=None, return_dict=False)[0]
    except Exception as exc:
        error = ProcessingError(f"a denoising step of {len(calls)} requests failed: {exc}")
        for call in calls:
            call.fail(error)
        return
    for i, call in enumerate(calls):
        call.resolve((out[i : i + 1],))


def denoise_batched(
    base: Any,
    loop: StepLoop,
    hooks: TransformerHooks,
    request: Request,
    held: StepRequest,
    kwargs: dict[str, Any],
    img2img: bool,
    adapters: AdapterSet = (),
) -> torch.Tensor:
    """A request's pipeline call whose transformer calls the step loop runs in batches
    (with its LoRA `adapters`); returns the packed latents."""
    proxy = LoopTransformer(base.transformer, loop, held, adapters)
    pipe = request_pipeline(base, img2img=img2img, transformer=proxy)

    def on_step() -> None:
        request.steps_run += 1  # no step cache: every block of every step runs
        proxy.step_ended()
        held.step_ended()

    kwargs["callback_on_step_end"] = hooks.step_callback(request, on_step)
    request.pipe_start = time.perf_counter()
    packed = pipe(**kwargs).images
    # Denoising counts from its first step: the wait for a slot is not part of it.
    request.denoise_start = held.first_step_perf or proxy.first_call_at
    if held.first_step_perf is not None and proxy.first_call_at is not None:
        request.waited_s = max(held.first_step_perf - proxy.first_call_at, 0.0)
    return packed
