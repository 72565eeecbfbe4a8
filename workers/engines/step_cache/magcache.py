"""MagCache: skip the block stack of a step while the accumulated magnitude error is small.

diffusers' `MagCacheConfig`. MagCache needs per-step magnitude ratios of the checkpoint:
`magcache_calibration_config` plus `record_magcache_ratios` run diffusers' own calibration
(`MagCacheConfig(calibrate=True)`: no step is skipped and the tail block records
mean(|residual_t| / |residual_t-1|) per step) and hand the ratios back instead of printing
them. The engine calibrates once per (num_inference_steps, width, height) with a fixed prompt
and seed and reuses the ratios for every later request with those settings (img2img uses
the tail of the full schedule's ratios, `magcache_ratios_for`); see
`DiffusersEngine.calibrate_magcache`. For FLUX.1 diffusers also ships `FLUX_MAG_RATIOS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workers.engines.step_cache.base import (
    DiffusersCacheState,
    Hook,
    PipelineCall,
    Technique,
    apply_diffusers_cache,
    block_stack,
    float_param,
    int_param,
)

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MagcacheConfig:
    """MagCache parameters; names follow diffusers' `MagCacheConfig` arguments.

    diffusers' defaults: with ratios calibrated on the tiny model, 5 of 8 steps run.
    """

    threshold: float = float_param(0.06, 0.0, 10.0, "accumulated error allowed")
    max_skip_steps: int = int_param(3, 1, 1000, "consecutive skips allowed")
    retention_ratio: float = float_param(0.2, 0.0, 1.0, "leading fraction never skipped")

    def to_diffusers(self, mag_ratios: Sequence[float], num_steps: int) -> Any:
        """diffusers `MagCacheConfig` with calibrated `mag_ratios` (one per step)."""
        from diffusers import MagCacheConfig

        return MagCacheConfig(
            threshold=self.threshold,
            max_skip_steps=self.max_skip_steps,
            retention_ratio=self.retention_ratio,
            num_inference_steps=num_steps,
            mag_ratios=list(mag_ratios),
        )


def apply_magcache(
    pipe: Any, config: MagcacheConfig, mag_ratios: Sequence[float], num_steps: int
) -> DiffusersCacheState:
    """Enable MagCache on `pipe.transformer` for a run of `num_steps` steps with calibrated
    `mag_ratios`; `reset()` the returned state to remove it."""
    return apply_diffusers_cache(pipe.transformer, config.to_diffusers(mag_ratios, num_steps))


class MagcacheHook(Hook[MagcacheConfig]):
    def apply(self, pipe: Any, call: PipelineCall) -> DiffusersCacheState:
        if call.mag_ratios is None:
            raise ValueError("magcache needs calibrated mag_ratios")
        return apply_magcache(pipe, self.config, call.mag_ratios, call.num_steps)


TECHNIQUE = Technique(
    name="magcache",
    config_type=MagcacheConfig,
    hook_type=MagcacheHook,
    skips_steps=True,
    diffusers_hooks=True,
)


# --- calibration ----------------------------------------------------------------------------


def magcache_calibration_config(num_steps: int) -> Any:
    """diffusers' MagCache calibration mode: skips nothing, records a ratio per step.

    `num_inference_steps` is one more than the run has so that the hook neither prints the
    ratios nor clears them after the last step; `record_magcache_ratios` collects them.
    """
    from diffusers import MagCacheConfig

    return MagCacheConfig(calibrate=True, num_inference_steps=num_steps + 1)


def record_magcache_ratios(transformer: torch.nn.Module) -> list[float]:
    """After `enable_cache(magcache_calibration_config(n))`: a list that fills with the
    calibrated ratio of each step of the next run (first context only, i.e. "cond")."""
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK

    tail = block_stack(transformer)[-1]
    hook = tail._diffusers_hook.get_hook(_MAG_CACHE_BLOCK_HOOK)
    if hook is None or not hook.is_tail:
        raise RuntimeError("MagCache calibration hook not found on the last transformer block")
    ratios: list[float] = []
    contexts: list[str] = []
    original = hook._perform_calibration_step

    def perform(state: Any, residual: torch.Tensor) -> None:
        original(state, residual)
        name = hook.state_manager._context.name if hook.state_manager._context else ""
        if not contexts:
            contexts.append(name)
        if name == contexts[0]:
            ratios.append(float(state.calibration_ratios[-1]))

    hook._perform_calibration_step = perform
    return ratios


def magcache_ratios_for(full: Sequence[float], steps: int, num_steps: int) -> list[float]:
    """Ratios for a run of `num_steps` of a `steps`-step schedule, from calibrated `full`.

    `full` is first stretched to `steps` entries if it has another length (as diffusers does
    with e.g. its 28-step `FLUX_MAG_RATIOS`). img2img runs the last `num_steps` steps; the
    first of them has no previous residual and is never skipped (retention), so the tail
    slice fits.
    """
    ratios = [float(r) for r in full]
    if len(ratios) != steps:
        import torch
        from diffusers.hooks.mag_cache import nearest_interp

        ratios = nearest_interp(torch.tensor(ratios), steps).tolist()
    if num_steps >= steps:
        return ratios
    return [1.0, *ratios[steps - num_steps + 1 :]]
