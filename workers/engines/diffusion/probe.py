"""The resource manager's probe of one image size: a denoising step on zeros."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workers.engines.base import ImageParams
from workers.resources import ShapeProbe

if TYPE_CHECKING:
    from workers.engines.families.base import ModelFamily


def shape_probe(
    family: ModelFamily, params: ImageParams, opts: dict[str, Any]
) -> ShapeProbe | None:
    """One denoising step of `params`' size on zeros, as the family's transformer takes it
    (`opts`: the engine's device and dtype); None where the family gives no probe."""
    import torch

    if family.probe_inputs(1, params, opts) is None:
        return None
    transformer = family.pipe.transformer

    def inputs(rows: int) -> dict[str, Any]:
        return family.probe_inputs(rows, params, opts) or {}

    def forward(given: dict[str, Any]) -> Any:
        with torch.no_grad():
            return transformer(**{**given, "return_dict": False})[0]

    return ShapeProbe(family.shape_label(params), inputs, forward)
