"""Pyramid Attention Broadcast: reuse attention outputs across steps; every block runs.

diffusers' `PyramidAttentionBroadcastConfig` on the spatial attention (all of Flux's
attention is spatial): within the timestep window (`timestep_skip_start`,
`timestep_skip_end`) each attention is computed once every
`spatial_attention_block_skip_range` steps and its output broadcast to the steps between.
No step is skipped as a whole, so `steps_run` equals the steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omni_tasks.errors import ConfigError
from workers.engines.step_cache.base import (
    DiffusersCacheState,
    Hook,
    PipelineCall,
    Technique,
    apply_diffusers_cache,
    float_param,
    int_param,
)


@dataclass(frozen=True)
class PabConfig:
    """PAB parameters; the timestep window must be non-empty (ConfigError otherwise)."""

    spatial_attention_block_skip_range: int = int_param(2, 1, 1000, "attn computed 1 in N")
    timestep_skip_start: float = float_param(100, 0, 1000, "skip only for timesteps above")
    timestep_skip_end: float = float_param(800, 0, 1000, "skip only for timesteps below")

    def __post_init__(self) -> None:
        if self.timestep_skip_start >= self.timestep_skip_end:
            raise ConfigError(
                "step_cache_params.timestep_skip_start", "must be below timestep_skip_end"
            )

    def to_diffusers(self, current_timestep: Callable[[], Any]) -> Any:
        """diffusers `PyramidAttentionBroadcastConfig`; `current_timestep` gives the running
        step's timestep (0-1000)."""
        from diffusers import PyramidAttentionBroadcastConfig

        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.spatial_attention_block_skip_range,
            spatial_attention_timestep_skip_range=(
                int(self.timestep_skip_start),
                int(self.timestep_skip_end),
            ),
            current_timestep_callback=current_timestep,
        )


def apply_pab(
    pipe: Any, config: PabConfig, current_timestep: Callable[[], Any] | None = None
) -> DiffusersCacheState:
    """Enable PAB on `pipe.transformer`; `reset()` the returned state to remove it.

    `current_timestep`: by default `pipe.current_timestep`, which FluxImg2ImgPipeline does
    not have.
    """
    timestep = current_timestep or (lambda: pipe.current_timestep)
    return apply_diffusers_cache(pipe.transformer, config.to_diffusers(timestep))


class PabHook(Hook[PabConfig]):
    def apply(self, pipe: Any, call: PipelineCall) -> DiffusersCacheState:
        return apply_pab(pipe, self.config, call.current_timestep)


TECHNIQUE = Technique(
    name="pab",
    config_type=PabConfig,
    hook_type=PabHook,
    skips_steps=False,
    diffusers_hooks=True,
)
