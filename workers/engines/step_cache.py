"""Step-level DiT acceleration: `StepCacheSettings` -> a diffusers cache config or cache-dit.

One small function per technique turns validated settings into what the library takes:

| mode        | library                                          | skips                       |
|-------------|--------------------------------------------------|-----------------------------|
| none        | -                                                | nothing (bit-identical)     |
| taylorseer  | diffusers `TaylorSeerCacheConfig`                | whole steps (lite) or attn  |
| magcache    | diffusers `MagCacheConfig` (calibrated ratios)   | the block stack of a step   |
| first_block | diffusers `FirstBlockCacheConfig`                | all blocks after the first  |
| pab         | diffusers `PyramidAttentionBroadcastConfig`      | attention only (blocks run) |
| cache_dit   | `cache_dit.enable_cache(pipe, DBCacheConfig())`  | blocks after the first Fn   |

The defaults below are chosen so that every mode actually skips work on the tiny
random-weight Flux (`workers.models.tiny_flux`) at 8 steps: random weights change far more
between steps than a trained model does, so the residual thresholds must be huge there
(first_block and cache_dit skip nothing below ~0.35 and ~0.5). For a real FLUX.1 checkpoint
pass the published values instead, e.g. first_block `threshold=0.08`, cache_dit
`Fn_compute_blocks=8, max_warmup_steps=8, residual_diff_threshold=0.08` (28+ steps),
taylorseer `cache_interval=5, disable_cache_before_step=3` (diffusers' defaults), magcache
with ratios calibrated for that checkpoint (or diffusers' `FLUX_MAG_RATIOS` for FLUX.1).

MagCache needs per-step magnitude ratios of the checkpoint. `magcache_calibration_config`
plus `record_magcache_ratios` run diffusers' own calibration (`MagCacheConfig(calibrate=True)`:
no step is skipped and the tail block records mean(|residual_t| / |residual_t-1|) per step)
and hand the ratios back instead of printing them. The engine calibrates once per
(num_inference_steps, width, height) with a fixed prompt and seed and reuses the ratios for
every later request with those settings (img2img uses the tail of the full schedule's
ratios); see `FluxDiffusionEngine.calibrate_magcache`.

Hooks are stateful and sit on the transformer that all threads share: `applied` enables a
mode for one pipeline call and always disables it afterwards (exception and timeout
included), so no state leaks into the next request. The caller serializes the calls.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omni_tasks.errors import ConfigError
from workers.engines.base import StepCacheSettings

if TYPE_CHECKING:
    import torch

STEP_CACHE_MODES: tuple[str, ...] = (
    "none",
    "taylorseer",
    "magcache",
    "first_block",
    "pab",
    "cache_dit",
)
# Modes that skip the whole block stack on some steps (so `steps_run` drops below the steps).
STEP_SKIPPING_MODES: frozenset[str] = frozenset(
    {"taylorseer", "magcache", "first_block", "cache_dit"}
)
# Modes built on diffusers' hooks, whose state is kept per `transformer.cache_context(name)`.
DIFFUSERS_MODES: frozenset[str] = frozenset({"taylorseer", "magcache", "first_block", "pab"})
CACHE_DIT_VERSION = "1.5.3"


@dataclass(frozen=True)
class _Param:
    default: float
    integer: bool
    low: float
    high: float
    doc: str


# name -> default, kind and range; names follow the library's own argument names.
PARAMS: dict[str, dict[str, _Param]] = {
    "none": {},
    "taylorseer": {
        # Full computes at steps 0, 1, then every 2nd step (1, 3, 5, 7 of 0..7): 5 of 8 run.
        "cache_interval": _Param(2, True, 1, 1000, "full compute every N steps"),
        "disable_cache_before_step": _Param(2, True, 0, 1000, "steps always computed first"),
        "disable_cache_after_step": _Param(-1, True, -1, 1000, "compute from here on; -1 off"),
        "max_order": _Param(1, True, 1, 4, "Taylor expansion order"),
        # 1: TaylorSeer-Lite, skip every block and extrapolate the transformer output (whole
        # steps skipped); 0: extrapolate each attention output (blocks still run).
        "lite": _Param(1, True, 0, 1, "1 skips whole steps, 0 only attention"),
    },
    "magcache": {
        # diffusers' defaults: with ratios calibrated on the tiny model, 5 of 8 steps run.
        "threshold": _Param(0.06, False, 0.0, 10.0, "accumulated error allowed"),
        "max_skip_steps": _Param(3, True, 1, 1000, "consecutive skips allowed"),
        "retention_ratio": _Param(0.2, False, 0.0, 1.0, "leading fraction never skipped"),
    },
    "first_block": {
        # Random weights: nothing is skipped below ~0.35; 1.0 runs 1 of 8 steps' stacks.
        "threshold": _Param(1.0, False, 0.0, 100.0, "first-block residual change allowed"),
    },
    "pab": {
        "spatial_attention_block_skip_range": _Param(2, True, 1, 1000, "attn computed 1 in N"),
        "timestep_skip_start": _Param(100, False, 0, 1000, "skip only for timesteps above"),
        "timestep_skip_end": _Param(800, False, 0, 1000, "skip only for timesteps below"),
    },
    "cache_dit": {
        # Fn=1, Bn=0, warmup 2, threshold 1.0: 2 of 8 steps' stacks run on the tiny model;
        # cache-dit's own defaults (Fn=8, warmup 8) cache nothing at 8 steps and run slower.
        "Fn_compute_blocks": _Param(1, True, 1, 1000, "first blocks always computed"),
        "Bn_compute_blocks": _Param(0, True, 0, 1000, "last blocks always computed"),
        "max_warmup_steps": _Param(2, True, 0, 1000, "steps never cached"),
        "residual_diff_threshold": _Param(1.0, False, 0.0, 100.0, "residual change allowed"),
        "max_cached_steps": _Param(-1, True, -1, 1000, "cached steps allowed; -1 any"),
        "max_continuous_cached_steps": _Param(-1, True, -1, 1000, "in a row; -1 any"),
    },
}


def defaults(mode: str) -> dict[str, float | int]:
    """The documented default params of `mode`."""
    if mode not in PARAMS:
        raise ConfigError("step_cache", _bad_mode(mode))
    return {name: _cast(p, p.default) for name, p in PARAMS[mode].items()}


def resolve(settings: StepCacheSettings) -> dict[str, float | int]:
    """Validate `settings`; return the mode's full params (defaults filled in).

    Raises ConfigError naming `step_cache` (unknown mode, cache-dit missing) or
    `step_cache_params.<name>` (unknown name, not a number, not integral, out of range).
    """
    mode = settings.mode
    if not isinstance(mode, str) or mode not in PARAMS:
        raise ConfigError("step_cache", _bad_mode(mode))
    if mode == "cache_dit" and not cache_dit_available():
        raise ConfigError(
            "step_cache",
            f"mode 'cache_dit' needs the cache-dit package (pip install --no-deps "
            f"cache-dit=={CACHE_DIT_VERSION}); it is not installed in this worker",
        )
    specs = PARAMS[mode]
    resolved = defaults(mode)
    if not isinstance(settings.params, Mapping):
        raise ConfigError("step_cache_params", "must be a mapping of names to numbers")
    for name, value in settings.params.items():
        field = f"step_cache_params.{name}"
        spec = specs.get(name)
        if spec is None:
            known = ", ".join(specs) or "none"
            raise ConfigError(field, f"not a parameter of mode {mode!r} (known: {known})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(field, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(field, f"must be finite, got {value!r}")
        if spec.integer and value != int(value):
            raise ConfigError(field, f"must be an integer, got {value!r}")
        if not spec.low <= value <= spec.high:
            raise ConfigError(field, f"must be in [{spec.low:g}, {spec.high:g}], got {value!r}")
        resolved[name] = _cast(spec, value)
    if mode == "pab" and resolved["timestep_skip_start"] >= resolved["timestep_skip_end"]:
        raise ConfigError(
            "step_cache_params.timestep_skip_start", "must be below timestep_skip_end"
        )
    return resolved


def cache_key(settings: StepCacheSettings) -> str:
    """A canonical text for a result cache key: mode plus every param, defaults filled in.

    Two settings that run the same computation give the same text ("none" for mode none).
    """
    params = resolve(settings)
    if not params:
        return settings.mode
    return settings.mode + "(" + ",".join(f"{k}={params[k]!r}" for k in sorted(params)) + ")"


def cache_dit_available() -> bool:
    return importlib.util.find_spec("cache_dit") is not None


# --- one function per technique -------------------------------------------------------------


def taylorseer_config(params: Mapping[str, float], dtype: torch.dtype) -> Any:
    """diffusers `TaylorSeerCacheConfig`; Taylor factors kept in the transformer's dtype."""
    from diffusers import TaylorSeerCacheConfig

    after = int(params["disable_cache_after_step"])
    return TaylorSeerCacheConfig(
        cache_interval=int(params["cache_interval"]),
        disable_cache_before_step=int(params["disable_cache_before_step"]),
        disable_cache_after_step=None if after < 0 else after,
        max_order=int(params["max_order"]),
        taylor_factors_dtype=dtype,
        use_lite_mode=bool(params["lite"]),
    )


def magcache_config(
    params: Mapping[str, float], mag_ratios: Sequence[float], num_steps: int
) -> Any:
    """diffusers `MagCacheConfig` with calibrated `mag_ratios` (one per denoising step)."""
    from diffusers import MagCacheConfig

    return MagCacheConfig(
        threshold=float(params["threshold"]),
        max_skip_steps=int(params["max_skip_steps"]),
        retention_ratio=float(params["retention_ratio"]),
        num_inference_steps=num_steps,
        mag_ratios=list(mag_ratios),
    )


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


def first_block_config(params: Mapping[str, float]) -> Any:
    """diffusers `FirstBlockCacheConfig`."""
    from diffusers import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=float(params["threshold"]))


def pab_config(params: Mapping[str, float], current_timestep: Callable[[], Any]) -> Any:
    """diffusers `PyramidAttentionBroadcastConfig` on the spatial (all Flux) attention."""
    from diffusers import PyramidAttentionBroadcastConfig

    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=int(params["spatial_attention_block_skip_range"]),
        spatial_attention_timestep_skip_range=(
            int(params["timestep_skip_start"]),
            int(params["timestep_skip_end"]),
        ),
        current_timestep_callback=current_timestep,
    )


def cache_dit_config(params: Mapping[str, float], num_steps: int, separate_cfg: bool) -> Any:
    """cache-dit `DBCacheConfig` (DBCache, F<n>B<n>); `separate_cfg` for true-CFG requests,
    whose transformer runs twice per step (cond, then uncond)."""
    _quiet_cache_dit()
    from cache_dit import DBCacheConfig

    return DBCacheConfig(
        Fn_compute_blocks=int(params["Fn_compute_blocks"]),
        Bn_compute_blocks=int(params["Bn_compute_blocks"]),
        max_warmup_steps=int(params["max_warmup_steps"]),
        residual_diff_threshold=float(params["residual_diff_threshold"]),
        max_cached_steps=int(params["max_cached_steps"]),
        max_continuous_cached_steps=int(params["max_continuous_cached_steps"]),
        num_inference_steps=num_steps,
        enable_separate_cfg=separate_cfg,
        cfg_compute_first=False,
    )


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
    """Enable `mode` on `pipe` (its transformer) for the duration of one pipeline call.

    `current_timestep` (PAB): the timestep of the running step, 0-1000; by default
    `pipe.current_timestep`, which FluxImg2ImgPipeline does not have.

    Always disables it again, so the next request starts from a hook-free transformer.
    The caller must hold the lock that serializes calls into the shared transformer.
    """
    if mode == "none":
        yield
        return
    if mode == "cache_dit":
        _quiet_cache_dit()
        import cache_dit

        saved = _TransformerState(pipe.transformer)
        try:
            cache_dit.enable_cache(pipe, cache_config=cache_dit_config(params, num_steps, true_cfg))
            try:
                yield
            finally:
                cache_dit.disable_cache(pipe)
        finally:
            saved.restore()
        return

    transformer = pipe.transformer
    if mode == "taylorseer":
        config = taylorseer_config(params, transformer.dtype)
    elif mode == "magcache":
        if mag_ratios is None:
            raise ValueError("magcache needs calibrated mag_ratios")
        config = magcache_config(params, mag_ratios, num_steps)
    elif mode == "first_block":
        config = first_block_config(params)
    elif mode == "pab":
        config = pab_config(params, current_timestep or (lambda: pipe.current_timestep))
    else:  # resolve() rejects these first
        raise ConfigError("step_cache", _bad_mode(mode))
    enable_diffusers_cache(transformer, config)
    try:
        yield
    finally:
        disable_diffusers_cache(transformer)


def enable_diffusers_cache(transformer: Any, config: Any) -> None:
    if transformer.is_cache_enabled:  # left over by a crash in between: start clean
        transformer.disable_cache()
    transformer.enable_cache(config)


def disable_diffusers_cache(transformer: Any) -> None:
    if transformer.is_cache_enabled:
        transformer._reset_stateful_cache()
        transformer.disable_cache()


class _TransformerState:
    """What cache-dit leaves changed on a transformer after `disable_cache`, to undo it.

    cache-dit patches `forward` of the transformer (its own copy of Flux's forward, kept
    after `disable_cache`) and swaps the block lists in and out around every call with
    `unittest.mock.patch.object`, which re-registers them last: `transformer_blocks` then
    follows `single_transformer_blocks`, and diffusers' block caches, which take the first
    registered block as the head, would pick the wrong blocks.
    """

    _ATTRS = ("forward", "_is_patched")

    def __init__(self, transformer: Any) -> None:
        self.transformer = transformer
        self.order = list(transformer._modules)
        self.attrs = {a: transformer.__dict__.get(a, _MISSING) for a in self._ATTRS}
        self.blocks = [(b, b.__dict__.get("forward", _MISSING)) for b in block_stack(transformer)]

    def restore(self) -> None:
        transformer = self.transformer
        modules = transformer._modules
        if list(modules) != self.order:
            for name in self.order + [n for n in modules if n not in self.order]:
                if name in modules:
                    modules[name] = modules.pop(name)  # in place: re-insert in order
        for attr, value in self.attrs.items():
            _put_back(transformer, attr, value)
        for block, forward in self.blocks:
            _put_back(block, "forward", forward)


_MISSING = object()


def _put_back(owner: Any, attr: str, value: Any) -> None:
    if value is _MISSING:
        owner.__dict__.pop(attr, None)
    else:
        owner.__dict__[attr] = value


# --- helpers ----------------------------------------------------------------------------------


def _cast(spec: _Param, value: float) -> float | int:
    return int(value) if spec.integer else float(value)


def _bad_mode(mode: object) -> str:
    return f"unknown mode {mode!r}; one of {', '.join(STEP_CACHE_MODES)}"


def block_stack(transformer: Any) -> list[Any]:
    """The transformer blocks in execution order (Flux: double, then single blocks)."""
    blocks: list[Any] = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks.extend(getattr(transformer, name, None) or [])
    if not blocks:
        raise RuntimeError(f"{type(transformer).__name__} has no transformer blocks")
    return blocks


_QUIETED = False


def _quiet_cache_dit() -> None:
    """cache-dit logs several INFO lines and a WARNING per enable/disable: keep errors only,
    unless CACHE_DIT_LOG_LEVEL says otherwise (read once, when cache_dit is imported)."""
    global _QUIETED
    if _QUIETED:
        return
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    import logging

    import cache_dit  # noqa: F401  (creates its loggers with the level above)

    level = os.environ["CACHE_DIT_LOG_LEVEL"].upper()
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(getattr(logging, level, logging.ERROR))
    _QUIETED = True
