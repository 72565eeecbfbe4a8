"""Step-level DiT acceleration: `StepCacheSettings` -> a diffusers cache config or cache-dit.

A registry of techniques, one module each (a Config of its parameters, a State, a Hook and
an `apply_<technique>` function, see `base`), turns validated settings into what the
library takes:

| mode        | library                                          | skips                       |
|-------------|--------------------------------------------------|-----------------------------|
| none        | -                                                | nothing (bit-identical)     |
| taylorseer  | diffusers `TaylorSeerCacheConfig`                | whole steps (lite) or attn  |
| magcache    | diffusers `MagCacheConfig` (calibrated ratios)   | the block stack of a step   |
| first_block | diffusers `FirstBlockCacheConfig`                | all blocks after the first  |
| pab         | diffusers `PyramidAttentionBroadcastConfig`      | attention only (blocks run) |
| cache_dit   | `cache_dit.enable_cache(pipe, DBCacheConfig())`  | blocks after the first Fn   |

The defaults (each technique's Config) are chosen so that every mode actually skips work on
the tiny random-weight Flux (`workers.models.tiny_flux`) at 8 steps: random weights change
far more between steps than a trained model does, so the residual thresholds must be huge
there (first_block and cache_dit skip nothing below ~0.35 and ~0.5). For a real FLUX.1
checkpoint pass the published values instead, e.g. first_block `threshold=0.08`, cache_dit
`Fn_compute_blocks=8, max_warmup_steps=8, residual_diff_threshold=0.08` (28+ steps),
taylorseer `cache_interval=5, disable_cache_before_step=3` (diffusers' defaults), magcache
with ratios calibrated for that checkpoint (or diffusers' `FLUX_MAG_RATIOS` for FLUX.1).

MagCache needs per-step magnitude ratios of the checkpoint. `magcache_calibration_config`
plus `record_magcache_ratios` run diffusers' own calibration (`MagCacheConfig(calibrate=True)`:
no step is skipped and the tail block records mean(|residual_t| / |residual_t-1|) per step)
and hand the ratios back instead of printing them. The engine calibrates once per
(num_inference_steps, width, height) with a fixed prompt and seed and reuses the ratios for
every later request with those settings (img2img uses the tail of the full schedule's
ratios); see `DiffusersEngine.calibrate_magcache`.

Hooks are stateful and sit on the transformer that all threads share: `applied` enables a
mode for one pipeline call and always disables it afterwards (exception and timeout
included), so no state leaks into the next request. The caller serializes the calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from omni_tasks.errors import ConfigError
from omni_tasks.requests import STEP_CACHE_MODES
from workers.engines.base import StepCacheSettings
from workers.engines.step_cache import cache_dit, first_block, magcache, pab, taylorseer
from workers.engines.step_cache.base import (
    Hook,
    Param,
    PipelineCall,
    Resolved,
    Technique,
    block_stack,
    disable_diffusers_cache,
    enable_diffusers_cache,
)
from workers.engines.step_cache.cache_dit import CACHE_DIT_VERSION
from workers.engines.step_cache.magcache import (
    magcache_calibration_config,
    magcache_ratios_for,
    record_magcache_ratios,
)

__all__ = [
    "CACHE_DIT_VERSION",
    "DIFFUSERS_MODES",
    "PARAMS",
    "STEP_CACHE_MODES",
    "STEP_SKIPPING_MODES",
    "TECHNIQUES",
    "applied",
    "block_stack",
    "cache_dit_available",
    "cache_key",
    "defaults",
    "disable_diffusers_cache",
    "enable_diffusers_cache",
    "magcache_calibration_config",
    "magcache_ratios_for",
    "record_magcache_ratios",
    "resolve",
    "technique",
]


# --- mode none ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoneConfig:
    """Mode none has no parameters."""


class _NothingEnabled:
    def reset(self) -> None:
        """Nothing was put on the transformer."""


class NoneHook(Hook[NoneConfig]):
    """Runs the pipeline as it is: bit-identical to no step cache at all."""

    def apply(self, pipe: Any, call: PipelineCall) -> _NothingEnabled:
        return _NothingEnabled()


NONE = Technique(
    name="none",
    config_type=NoneConfig,
    hook_type=NoneHook,
    skips_steps=False,
    diffusers_hooks=False,
)


# --- the registry ---------------------------------------------------------------------------


def cache_dit_available() -> bool:
    """Whether mode cache_dit can run in this worker (the cache-dit package is installed)."""
    return cache_dit.installed()


# cache_dit's availability goes through `cache_dit_available`, looked up on each call, so
# that function stays the one switch for it.
_CACHE_DIT = dataclasses.replace(cache_dit.TECHNIQUE, available=lambda: cache_dit_available())

# mode name -> technique unit, in the order of STEP_CACHE_MODES.
TECHNIQUES: dict[str, Technique[Any]] = {
    unit.name: unit
    for unit in (
        NONE,
        taylorseer.TECHNIQUE,
        magcache.TECHNIQUE,
        first_block.TECHNIQUE,
        pab.TECHNIQUE,
        _CACHE_DIT,
    )
}
if tuple(TECHNIQUES) != STEP_CACHE_MODES:
    raise ImportError(f"step cache techniques {tuple(TECHNIQUES)} != {STEP_CACHE_MODES}")

# name -> default, kind and range per mode; names follow the library's own argument names.
PARAMS: dict[str, dict[str, Param]] = {mode: unit.params for mode, unit in TECHNIQUES.items()}
# Modes that skip the whole block stack on some steps (so `steps_run` drops below the steps).
STEP_SKIPPING_MODES: frozenset[str] = frozenset(m for m, u in TECHNIQUES.items() if u.skips_steps)
# Modes built on diffusers' hooks, whose state is kept per `transformer.cache_context(name)`.
DIFFUSERS_MODES: frozenset[str] = frozenset(m for m, u in TECHNIQUES.items() if u.diffusers_hooks)


def technique(mode: object) -> Technique[Any]:
    """The technique unit of `mode`; ConfigError naming `step_cache` if there is none."""
    if not isinstance(mode, str) or mode not in TECHNIQUES:
        raise ConfigError("step_cache", f"unknown mode {mode!r}; one of {', '.join(TECHNIQUES)}")
    return TECHNIQUES[mode]


def defaults(mode: str) -> Resolved:
    """The documented default params of `mode`."""
    return technique(mode).defaults()


def resolve(settings: StepCacheSettings) -> Resolved:
    """Validate `settings`; return the mode's full params (defaults filled in).

    Raises ConfigError naming `step_cache` (unknown mode, cache-dit missing) or
    `step_cache_params.<name>` (unknown name, not a number, not integral, out of range).
    """
    unit = technique(settings.mode)
    if not unit.available():
        raise ConfigError("step_cache", unit.unavailable)
    return unit.resolve(settings.params)


def cache_key(settings: StepCacheSettings) -> str:
    """A canonical text for a result cache key: mode plus every param, defaults filled in.

    Two settings that run the same computation give the same text ("none" for mode none).
    """
    params = resolve(settings)
    if not params:
        return settings.mode
    return settings.mode + "(" + ",".join(f"{k}={params[k]!r}" for k in sorted(params)) + ")"


@contextmanager
def applied(
    pipe: Any,
    mode: str,
    params: Mapping[str, float],
    *,
    num_steps: int,
    true_cfg: bool,
    mag_ratios: Sequence[float] | None = None,
    current_timestep: Callable[[], Any] | None = None,
) -> Iterator[None]:
    """Enable `mode` with resolved `params` on `pipe` (its transformer) for one pipeline call.

    `current_timestep` (PAB): the timestep of the running step, 0-1000; by default
    `pipe.current_timestep`, which FluxImg2ImgPipeline does not have. `mag_ratios`
    (MagCache): calibrated ratios, one per step of this call.

    Always disables it again, so the next request starts from a hook-free transformer.
    The caller must hold the lock that serializes calls into the shared transformer.
    """
    hook = technique(mode).hook(params)
    call = PipelineCall(num_steps, true_cfg, mag_ratios, current_timestep)
    with hook.applied(pipe, call):
        yield
