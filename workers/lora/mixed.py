"""Rows with different LoRA adapter sets in one forward pass (`lora.mixed_batches`).

PEFT's LoRA layers compute `base(x) + lora_B(lora_A(x)) * scaling` for the active
adapters, the same for every row. For a batch whose rows name different adapters (or
the same adapters at other scales), the layers run with LoRA disabled (the base pass) and
a forward hook on each LoRA layer adds, for every adapter the batch uses, its delta to the
rows that name it, times that row's scale: `scale * lora_alpha / r` (or `/ sqrt(r)` with
rsLoRA), as `set_adapters` would have set it. Rows without an adapter get nothing added,
so each row is what it would be in a batch of its own adapter set, up to the float
rounding of a larger matrix product. Only the rows that use an adapter pay for its delta.

The hooks assume what the DiTs of every family guarantee: every LoRA layer sees the batch's
rows along the first dimension.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omni_tasks.errors import ProcessingError
from omni_tasks.lora import AdapterSet

#: adapter name -> (rows that use it, each row's scale)
RowPlan = dict[str, tuple[Any, list[float]]]


@contextmanager
def per_row_deltas(transformer: Any, rows: list[AdapterSet]) -> Iterator[None]:
    """Meanwhile, each LoRA layer of `transformer` adds every row's own deltas."""
    import torch
    from peft.tuners.lora import LoraLayer

    device = next(transformer.parameters()).device
    plan: RowPlan = {}
    for name in sorted({n for row in rows for n, _ in row}):
        scales = [dict(row).get(name, 0.0) for row in rows]
        used = [i for i, s in enumerate(scales) if s != 0.0]
        if used:
            index = torch.tensor(used, device=device)
            plan[name] = (index, [scales[i] for i in used])
    handles = []
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            present = {n: p for n, p in plan.items() if n in module.lora_A}
            if present:
                handles.append(module.register_forward_hook(_adds(present, len(rows))))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adds(plan: RowPlan, batch: int) -> Any:
    import torch

    def hook(layer: Any, args: tuple[Any, ...], output: Any) -> Any:
        x = args[0]
        if x.shape[0] != batch or output.shape[0] != batch:
            raise ProcessingError(
                f"{type(layer).__name__} does not see one row per request: "
                "this model cannot mix adapters in a batch (set lora.mixed_batches false)"
            )
        for name, (index, scales) in plan.items():
            if layer.use_dora.get(name, False):
                raise ProcessingError(f"adapter {name!r} is DoRA: it cannot run per row")
            lora_a = layer.lora_A[name]
            rows = layer.lora_dropout[name](x.index_select(0, index).to(lora_a.weight.dtype))
            delta = layer.lora_B[name](lora_a(rows))
            base = _base_scaling(layer, name)
            factor = torch.tensor([s * base for s in scales], dtype=delta.dtype)
            factor = factor.to(delta.device).view(-1, *([1] * (delta.dim() - 1)))
            output = output.index_add(0, index, (delta * factor).to(output.dtype))
        return output

    return hook


def _base_scaling(layer: Any, name: str) -> float:
    """The layer's scaling of adapter `name` at scale 1 (PEFT's `set_scale`)."""
    alpha, rank = layer.lora_alpha[name], layer.r[name]
    if layer.use_rslora.get(name, False):
        return alpha / math.sqrt(rank)
    return alpha / rank
