"""The step-cache registry and its technique units, on the tiny random-weight Flux.

Each unit enabled through its Hook (or its `apply_<technique>` function) on a real pipeline,
run, and reset: the shared transformer must then be exactly as it was before the unit (no
diffusers hooks, no cache-dit patches, blocks in their registration order) and give the same
latents as a run without it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from omni_tasks.errors import ConfigError
from omni_tasks.requests import STEP_CACHE_MODES
from workers.engines import step_cache
from workers.engines.base import StepCacheSettings
from workers.engines.step_cache.base import DiffusersCacheState, PipelineCall, State
from workers.engines.step_cache.cache_dit import CacheDitConfig, CacheDitState, apply_cache_dit
from workers.engines.step_cache.first_block import FirstBlockConfig, apply_first_block
from workers.engines.step_cache.magcache import MagcacheConfig, apply_magcache
from workers.engines.step_cache.pab import PabConfig, apply_pab
from workers.engines.step_cache.taylorseer import TaylorSeerConfig, apply_taylorseer

PROMPT = "a photo of an astronaut riding a horse"
STEPS = 4
RATIOS = [1.0, 0.99, 0.98, 0.97]  # stand-in MagCache ratios, one per step
# The defaults documented for each mode (tuned for the tiny model at 8 steps).
DOCUMENTED: dict[str, dict[str, float | int]] = {
    "none": {},
    "taylorseer": {
        "cache_interval": 2,
        "disable_cache_before_step": 2,
        "disable_cache_after_step": -1,
        "max_order": 1,
        "lite": 1,
    },
    "magcache": {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2},
    "first_block": {"threshold": 1.0},
    "pab": {
        "spatial_attention_block_skip_range": 2,
        "timestep_skip_start": 100.0,
        "timestep_skip_end": 800.0,
    },
    "cache_dit": {
        "Fn_compute_blocks": 1,
        "Bn_compute_blocks": 0,
        "max_warmup_steps": 2,
        "residual_diff_threshold": 1.0,
        "max_cached_steps": -1,
        "max_continuous_cached_steps": -1,
    },
}
needs_cache_dit = pytest.mark.skipif(
    not step_cache.cache_dit_available(), reason="cache-dit is not installed"
)
ALL_MODES = [pytest.param(m, marks=needs_cache_dit) if m == "cache_dit" else m for m in DOCUMENTED]


@pytest.fixture(scope="module")
def pipe(tiny_flux_dir: Path) -> Any:
    from diffusers import FluxPipeline

    with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype to dtype
        warnings.simplefilter("ignore", FutureWarning)
        pipeline = FluxPipeline.from_pretrained(tiny_flux_dir, torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pristine(pipe: Any) -> dict[str, Any]:
    """The transformer as loaded, before any step cache touched it."""
    return snapshot(pipe.transformer)


@pytest.fixture(scope="module")
def reference(pipe: Any, pristine: dict[str, Any]) -> torch.Tensor:
    return run(pipe)


def run(pipe: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        PROMPT,
        width=64,
        height=64,
        num_inference_steps=STEPS,
        generator=generator,
        max_sequence_length=64,
        output_type="latent",
    ).images


def unpatched(module: torch.nn.Module) -> bool:
    """`module.forward` is its class's own forward (no hook or patch replaced it)."""
    return getattr(module.forward, "__func__", None) is type(module).forward


def snapshot(transformer: Any) -> dict[str, Any]:
    """What a step cache may change on the transformer."""
    hooks = []
    for name, module in transformer.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.hooks:
            hooks.append((name, sorted(registry.hooks)))
    return {
        "cache_enabled": transformer.is_cache_enabled,
        "diffusers_hooks": hooks,
        "forward": unpatched(transformer),
        "is_patched": transformer.__dict__.get("_is_patched", "absent"),
        "order": list(transformer._modules),
        "blocks": [unpatched(b) for b in step_cache.block_stack(transformer)],
    }


# --- the registry ---------------------------------------------------------------------------


def test_registry_covers_exactly_the_request_modes() -> None:
    assert step_cache.STEP_CACHE_MODES is STEP_CACHE_MODES
    assert tuple(step_cache.TECHNIQUES) == STEP_CACHE_MODES
    assert tuple(step_cache.PARAMS) == STEP_CACHE_MODES
    for mode, unit in step_cache.TECHNIQUES.items():
        assert unit.name == mode
        assert step_cache.technique(mode) is unit
    assert step_cache.STEP_SKIPPING_MODES == {"taylorseer", "magcache", "first_block", "cache_dit"}
    assert step_cache.DIFFUSERS_MODES == {"taylorseer", "magcache", "first_block", "pab"}


def test_engine_names_are_reexported() -> None:
    for name in (
        "resolve",
        "applied",
        "block_stack",
        "DIFFUSERS_MODES",
        "magcache_ratios_for",
        "enable_diffusers_cache",
        "disable_diffusers_cache",
        "magcache_calibration_config",
        "record_magcache_ratios",
        "cache_key",
        "defaults",
        "cache_dit_available",
    ):
        assert callable(getattr(step_cache, name)) or name == "DIFFUSERS_MODES", name


@pytest.mark.parametrize("mode", list(DOCUMENTED))
def test_config_defaults_are_the_documented_ones(mode: str) -> None:
    unit = step_cache.TECHNIQUES[mode]
    config = dataclasses.asdict(unit.config_type())
    assert config == DOCUMENTED[mode] == step_cache.defaults(mode)
    for name, value in DOCUMENTED[mode].items():
        spec = unit.params[name]
        assert type(config[name]) is type(value) is (int if spec.integer else float), name
        assert spec.low <= value <= spec.high and spec.doc, name
    if mode != "cache_dit" or step_cache.cache_dit_available():
        assert step_cache.resolve(StepCacheSettings(mode)) == DOCUMENTED[mode]


@pytest.mark.parametrize("mode", [m for m in DOCUMENTED if DOCUMENTED[m]])
def test_values_outside_the_documented_range_are_rejected(mode: str) -> None:
    unit = step_cache.TECHNIQUES[mode]
    for name, spec in unit.params.items():
        for value in (spec.low - 1, spec.high + 1):
            with pytest.raises(ConfigError) as info:
                unit.resolve({name: value})
            assert info.value.field == f"step_cache_params.{name}"
            assert f"must be in [{spec.low:g}, {spec.high:g}]" in str(info.value)


def test_pab_config_needs_a_timestep_window() -> None:
    with pytest.raises(ConfigError) as info:
        PabConfig(timestep_skip_start=800.0, timestep_skip_end=800.0)
    assert info.value.field == "step_cache_params.timestep_skip_start"


def test_unknown_mode_is_a_config_error_naming_step_cache(pipe: Any) -> None:
    attempts: list[Callable[[], object]] = [
        lambda: step_cache.resolve(StepCacheSettings("turbo")),
        lambda: step_cache.cache_key(StepCacheSettings("turbo")),
        lambda: step_cache.defaults("turbo"),
        lambda: step_cache.technique("turbo"),
        lambda: step_cache.applied(pipe, "turbo", {}, num_steps=STEPS, true_cfg=False).__enter__(),
    ]
    for attempt in attempts:
        with pytest.raises(ConfigError, match="unknown mode 'turbo'; one of none, ") as info:
            attempt()
        assert info.value.field == "step_cache"
    assert not pipe.transformer.is_cache_enabled


# --- State.reset() on the tiny Flux ---------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES)
def test_state_reset_leaves_the_transformer_hook_free(
    pipe: Any, pristine: dict[str, Any], reference: torch.Tensor, mode: str
) -> None:
    transformer = pipe.transformer
    hook = step_cache.TECHNIQUES[mode].hook(step_cache.defaults(mode))
    state = hook.apply(pipe, PipelineCall(STEPS, mag_ratios=RATIOS))
    enabled = snapshot(transformer)
    assert (enabled == pristine) == (mode == "none")
    assert transformer.is_cache_enabled == (mode in step_cache.DIFFUSERS_MODES)
    try:
        run(pipe)
    finally:
        state.reset()
    assert snapshot(transformer) == pristine
    state.reset()  # twice is harmless
    assert snapshot(transformer) == pristine
    assert torch.equal(run(pipe), reference)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_applied_resets_after_an_exception(
    pipe: Any, pristine: dict[str, Any], reference: torch.Tensor, mode: str
) -> None:
    transformer = pipe.transformer
    calls = [0]

    def fail_on_third(*_: object) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("boom")

    handle = transformer.register_forward_pre_hook(fail_on_third)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with step_cache.applied(
                pipe,
                mode,
                step_cache.defaults(mode),
                num_steps=STEPS,
                true_cfg=False,
                mag_ratios=RATIOS,
            ):
                assert (snapshot(transformer) == pristine) == (mode == "none")
                run(pipe)
    finally:
        handle.remove()
    assert calls[0] == 3
    assert snapshot(transformer) == pristine
    assert torch.equal(run(pipe), reference)


def test_failed_enable_leaves_nothing_behind(pipe: Any, pristine: dict[str, Any]) -> None:
    params = step_cache.defaults("magcache")
    with pytest.raises(ValueError, match="mag_ratios"):
        with step_cache.applied(pipe, "magcache", params, num_steps=STEPS, true_cfg=False):
            pytest.fail("entered without calibrated ratios")
    assert snapshot(pipe.transformer) == pristine


APPLY: dict[str, Callable[[Any], State]] = {
    "taylorseer": lambda pipe: apply_taylorseer(pipe, TaylorSeerConfig(max_order=2)),
    "magcache": lambda pipe: apply_magcache(pipe, MagcacheConfig(threshold=0.1), RATIOS, STEPS),
    "first_block": lambda pipe: apply_first_block(pipe, FirstBlockConfig(threshold=0.5)),
    "pab": lambda pipe: apply_pab(pipe, PabConfig(spatial_attention_block_skip_range=3)),
    "cache_dit": lambda pipe: apply_cache_dit(
        pipe, CacheDitConfig(max_warmup_steps=1), num_steps=STEPS, true_cfg=False
    ),
}


@pytest.mark.parametrize("mode", [m for m in ALL_MODES if m != "none"])
def test_apply_functions_return_a_state_that_resets(
    pipe: Any, pristine: dict[str, Any], reference: torch.Tensor, mode: str
) -> None:
    state = APPLY[mode](pipe)
    kind = CacheDitState if mode == "cache_dit" else DiffusersCacheState
    assert isinstance(state, kind) and state.enabled
    try:
        cached = run(pipe)
    finally:
        state.reset()
    assert not state.enabled
    assert snapshot(pipe.transformer) == pristine
    assert cached.shape == reference.shape
    assert torch.equal(run(pipe), reference)
