"""First Block Cache: skip every block after the first while the first one's residual
barely changes.

diffusers' `FirstBlockCacheConfig`: the first block always runs; when its output residual
differs from the previous step's by less than `threshold` (relative mean), the remaining
blocks are skipped and their cached residuals added instead. Random weights change far more
between steps than a trained model does: nothing is skipped below ~0.35 on the tiny Flux,
hence the default 1.0; use about 0.08 for a real FLUX.1 checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workers.engines.step_cache.base import (
    DiffusersCacheState,
    Hook,
    PipelineCall,
    Technique,
    apply_diffusers_cache,
    float_param,
)


@dataclass(frozen=True)
class FirstBlockConfig:
    """First Block Cache parameters; names follow `FirstBlockCacheConfig`'s arguments."""

    # Random weights: nothing is skipped below ~0.35; 1.0 runs 1 of 8 steps' stacks.
    threshold: float = float_param(1.0, 0.0, 100.0, "first-block residual change allowed")

    def to_diffusers(self) -> Any:
        """diffusers `FirstBlockCacheConfig`."""
        from diffusers import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.threshold)


def apply_first_block(pipe: Any, config: FirstBlockConfig) -> DiffusersCacheState:
    """Enable First Block Cache on `pipe.transformer`; `reset()` the returned state to
    remove it."""
    return apply_diffusers_cache(pipe.transformer, config.to_diffusers())


class FirstBlockHook(Hook[FirstBlockConfig]):
    def apply(self, pipe: Any, call: PipelineCall) -> DiffusersCacheState:
        return apply_first_block(pipe, self.config)


TECHNIQUE = Technique(
    name="first_block",
    config_type=FirstBlockConfig,
    hook_type=FirstBlockHook,
    skips_steps=True,
    diffusers_hooks=True,
)
