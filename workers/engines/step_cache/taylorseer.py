"""TaylorSeer: extrapolate skipped steps from a Taylor expansion of earlier outputs.

diffusers' `TaylorSeerCacheConfig`. Full computes run at the first
`disable_cache_before_step` steps and then every `cache_interval`-th step; in between the
cached outputs are extrapolated. Lite mode (`lite=1`, the default here) skips every block
and extrapolates the transformer's output, so whole steps are skipped; `lite=0`
extrapolates each attention output and the blocks still run.

The defaults suit 8 steps (full computes at 0, 1, 3, 5, 7: 5 of 8 run); diffusers' own
(`cache_interval=5, disable_cache_before_step=3`) suit a real FLUX.1 checkpoint at 28+ steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workers.engines.step_cache.base import (
    DiffusersCacheState,
    Hook,
    PipelineCall,
    Technique,
    apply_diffusers_cache,
    int_param,
)

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TaylorSeerConfig:
    """TaylorSeer parameters; names follow `TaylorSeerCacheConfig`'s arguments."""

    cache_interval: int = int_param(2, 1, 1000, "full compute every N steps")
    disable_cache_before_step: int = int_param(2, 0, 1000, "steps always computed first")
    disable_cache_after_step: int = int_param(-1, -1, 1000, "compute from here on; -1 off")
    max_order: int = int_param(1, 1, 4, "Taylor expansion order")
    # 1: TaylorSeer-Lite, skip every block and extrapolate the transformer output (whole
    # steps skipped); 0: extrapolate each attention output (blocks still run).
    lite: int = int_param(1, 0, 1, "1 skips whole steps, 0 only attention")

    def to_diffusers(self, dtype: torch.dtype) -> Any:
        """diffusers `TaylorSeerCacheConfig`; Taylor factors kept in `dtype`."""
        from diffusers import TaylorSeerCacheConfig

        after = self.disable_cache_after_step
        return TaylorSeerCacheConfig(
            cache_interval=self.cache_interval,
            disable_cache_before_step=self.disable_cache_before_step,
            disable_cache_after_step=None if after < 0 else after,
            max_order=self.max_order,
            taylor_factors_dtype=dtype,
            use_lite_mode=bool(self.lite),
        )


def apply_taylorseer(pipe: Any, config: TaylorSeerConfig) -> DiffusersCacheState:
    """Enable TaylorSeer on `pipe.transformer` (factors in the transformer's dtype);
    `reset()` the returned state to remove it."""
    transformer = pipe.transformer
    return apply_diffusers_cache(transformer, config.to_diffusers(transformer.dtype))


class TaylorSeerHook(Hook[TaylorSeerConfig]):
    def apply(self, pipe: Any, call: PipelineCall) -> DiffusersCacheState:
        return apply_taylorseer(pipe, self.config)


TECHNIQUE = Technique(
    name="taylorseer",
    config_type=TaylorSeerConfig,
    hook_type=TaylorSeerHook,
    skips_steps=True,
    diffusers_hooks=True,
)
