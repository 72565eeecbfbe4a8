"""The resource manager's probe of one image size: a denoising step on zeros."""

from __future__ import annotations

from typing import Any

from workers.engines.base import ImageParams
from workers.resources import ShapeProbe


def shape_probe(
    transformer: Any, params: ImageParams, size_multiple: int, seq: int, opts: dict[str, Any]
) -> ShapeProbe:
    """One denoising step of `params`' size, `seq` text tokens, on zeros; `opts`: the
    engine's device and dtype."""
    import torch

    cfg = transformer.config
    tokens = (params.width // size_multiple) * (params.height // size_multiple)

    def inputs(rows: int) -> dict[str, Any]:
        guided = bool(cfg.guidance_embeds)
        return {
            "hidden_states": torch.zeros(rows, tokens, cfg.in_channels, **opts),
            "encoder_hidden_states": torch.zeros(rows, seq, cfg.joint_attention_dim, **opts),
            "pooled_projections": torch.zeros(rows, cfg.pooled_projection_dim, **opts),
            "timestep": torch.ones(rows, **opts),
            "guidance": torch.full((rows,), 3.5, **opts) if guided else None,
            "txt_ids": torch.zeros(seq, 3, **opts),
            "img_ids": torch.zeros(tokens, 3, **opts),
        }

    def forward(given: dict[str, Any]) -> Any:
        with torch.no_grad():
            return transformer(**given, joint_attention_kwargs=None, return_dict=False)[0]

    return ShapeProbe(f"{params.width}x{params.height}", inputs, forward)
