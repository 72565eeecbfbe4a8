"""Batched denoising steps: the transformer calls of several requests as one call.

A request's pipeline gets a `LoopTransformer` in place of the shared transformer: the
pipeline runs its own denoising loop (its timesteps, guidance, scheduler, img2img start
step, CFG) and each of its transformer calls goes to the step loop, which stacks the
calls of one step into one forward pass (`run_batch`). Which arguments are stacked is the
family's `row_inputs` (tensors, along the batch axis) and `list_rows` (per-row lists);
every other argument is shared by the batch, so requests that share a step must agree on
it: the family's batch key says when they do (same size and text length), and so does
the LoRA adapter set unless per-row adapters are on (`workers.lora`). A call may carry
several rows (SD3 and Sana run CFG as two rows); each call gets back its own rows. The
image does not depend on what it was batched with beyond the float rounding of a larger
matrix product.
"""

from __future__ import annotations

import inspect
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from omni_tasks.errors import ProcessingError
from omni_tasks.lora import AdapterSet
from workers.engines.diffusion.hooks import LatentsObserver, Request, TransformerHooks
from workers.engines.diffusion.phases import request_pipeline
from workers.lora.diffusion import ADAPTERS_KEY
from workers.stepping.loop import StepLoop
from workers.stepping.request import ForwardCall, StepRequest

if TYPE_CHECKING:
    import torch

    from workers.engines.families.base import ModelFamily
    from workers.lora.diffusion import PipelineAdapters


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

    def cache_context(self, name: str, **_: Any) -> Any:
        """No step cache runs on a batched request (those run alone, on the real one)."""
        return nullcontext()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:  # Sana passes the hidden states by position: name them
            names = list(inspect.signature(self._transformer.forward).parameters)
            kwargs.update(zip(names, args, strict=False))
        for name, value in kwargs.items():
            if name.endswith("attention_kwargs") and value:
                raise ProcessingError(f"{name} cannot be batched")
        first = self._calls_in_step == 0
        self._calls_in_step += 1
        if self.first_call_at is None:
            self.first_call_at = time.perf_counter()
        kwargs[ADAPTERS_KEY] = self._adapters
        return self._loop.forward(self._request, kwargs, first_of_step=first)

    def step_ended(self) -> None:
        self._calls_in_step = 0


def stacked_inputs(family: ModelFamily, payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """One transformer call's arguments for several calls: rows stacked, the rest shared."""
    import torch

    payloads = family.align_rows(payloads)
    inputs: dict[str, Any] = {}
    for name, value in payloads[0].items():
        if name == ADAPTERS_KEY:
            continue
        if name in family.row_inputs and isinstance(value, torch.Tensor):
            inputs[name] = torch.cat([p[name] for p in payloads], dim=0)
        elif name in family.list_rows and isinstance(value, list):
            inputs[name] = [row for p in payloads for row in p[name]]
        else:
            inputs[name] = value
    inputs["return_dict"] = False
    return inputs


def run_batch(
    family: ModelFamily,
    transformer: Any,
    calls: list[ForwardCall],
    adapters: PipelineAdapters | None = None,
) -> None:
    """One forward pass for `calls` (at most one per request); resolves each with its
    rows. `adapters` applies each row's LoRA adapter set for the pass."""
    import torch

    payloads = [call.payload for call in calls]
    counts = [int(p["hidden_states"].shape[0]) for p in payloads]
    sets = [
        set_
        for p, n in zip(payloads, counts, strict=True)
        for set_ in [p.get(ADAPTERS_KEY, ())] * n
    ]
    try:
        inputs = stacked_inputs(family, payloads)
        lora = adapters.batch_rows(sets) if adapters is not None else nullcontext()
        with torch.no_grad(), lora:
            out = transformer(**inputs)[0]
    except Exception as exc:
        error = ProcessingError(f"a denoising step of {len(calls)} requests failed: {exc}")
        for call in calls:
            call.fail(error)
        return
    start = 0
    for call, count in zip(calls, counts, strict=True):
        call.resolve(_output(out[start : start + count], call.payload))
        start += count


def _output(rows: torch.Tensor, payload: dict[str, Any]) -> Any:
    """What the pipeline's own transformer call would have returned."""
    if payload.get("return_dict", True) is False:
        return (rows,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=rows)


def denoise_batched(
    family: ModelFamily,
    loop: StepLoop,
    hooks: TransformerHooks,
    request: Request,
    held: StepRequest,
    kwargs: dict[str, Any],
    with_image: bool,
    adapters: AdapterSet = (),
    on_latents: LatentsObserver | None = None,
) -> torch.Tensor:
    """A request's pipeline call whose transformer calls the step loop runs in batches
    (with its LoRA `adapters`); returns the pipeline's latents output."""
    base = family.pipe
    proxy = LoopTransformer(base.transformer, loop, held, adapters)
    pipe = request_pipeline(base, family.pipeline_class(with_image), transformer=proxy)

    def on_step() -> None:
        request.steps_run += 1  # no step cache: every block of every step runs
        proxy.step_ended()
        held.step_ended()

    kwargs["callback_on_step_end"] = hooks.step_callback(request, on_step, on_latents)
    request.pipe_start = time.perf_counter()
    latents = family.call_pipeline(pipe, kwargs)
    # Denoising counts from its first step: the wait for a slot is not part of it.
    request.denoise_start = held.first_step_perf or proxy.first_call_at
    if held.first_step_perf is not None and proxy.first_call_at is not None:
        request.waited_s = max(held.first_step_perf - proxy.first_call_at, 0.0)
    return latents
