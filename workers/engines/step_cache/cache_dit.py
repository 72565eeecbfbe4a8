"""cache-dit's DBCache (F<n>B<n>): the first `Fn` and last `Bn` blocks always run, the ones
in between are skipped while the residual after the first `Fn` barely changes.

`cache_dit.enable_cache(pipe, DBCacheConfig(...))` patches the pipeline and transformer;
`cache_dit.disable_cache` does not undo all of it, so `CacheDitState` records what it
changes and puts it back (see `_TransformerState`). cache-dit is an optional package
(`pip install --no-deps cache-dit==CACHE_DIT_VERSION`); it is imported only when used, with
its logging turned down to errors.

Defaults for the tiny random-weight Flux at 8 steps (Fn=1, Bn=0, warmup 2, threshold 1.0:
2 of 8 steps' stacks run); cache-dit's own defaults (Fn=8, warmup 8) cache nothing at 8
steps. For a real FLUX.1 checkpoint at 28+ steps use `Fn_compute_blocks=8,
max_warmup_steps=8, residual_diff_threshold=0.08`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

from workers.engines.step_cache.base import (
    Hook,
    PipelineCall,
    Technique,
    block_stack,
    float_param,
    int_param,
)

CACHE_DIT_VERSION = "1.5.3"
UNAVAILABLE = (
    f"mode 'cache_dit' needs the cache-dit package (pip install --no-deps "
    f"cache-dit=={CACHE_DIT_VERSION}); it is not installed in this worker"
)


@dataclass(frozen=True)
class CacheDitConfig:
    """DBCache parameters; names follow cache-dit's `DBCacheConfig` arguments."""

    Fn_compute_blocks: int = int_param(1, 1, 1000, "first blocks always computed")
    Bn_compute_blocks: int = int_param(0, 0, 1000, "last blocks always computed")
    max_warmup_steps: int = int_param(2, 0, 1000, "steps never cached")
    residual_diff_threshold: float = float_param(1.0, 0.0, 100.0, "residual change allowed")
    max_cached_steps: int = int_param(-1, -1, 1000, "cached steps allowed; -1 any")
    max_continuous_cached_steps: int = int_param(-1, -1, 1000, "in a row; -1 any")

    def to_cache_dit(self, num_steps: int, separate_cfg: bool) -> Any:
        """cache-dit `DBCacheConfig`; `separate_cfg` for true-CFG requests, whose
        transformer runs twice per step (cond, then uncond)."""
        quiet_cache_dit()
        from cache_dit import DBCacheConfig

        return DBCacheConfig(
            Fn_compute_blocks=self.Fn_compute_blocks,
            Bn_compute_blocks=self.Bn_compute_blocks,
            max_warmup_steps=self.max_warmup_steps,
            residual_diff_threshold=self.residual_diff_threshold,
            max_cached_steps=self.max_cached_steps,
            max_continuous_cached_steps=self.max_continuous_cached_steps,
            num_inference_steps=num_steps,
            enable_separate_cfg=separate_cfg,
            cfg_compute_first=False,
        )


class CacheDitState:
    """What cache-dit keeps on `pipe` and its transformer while enabled.

    `enabled`: `cache_dit.enable_cache` succeeded; `saved`: the transformer as it was
    before. `reset()` disables cache-dit (if enabled) and always restores the transformer.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.saved = _TransformerState(pipe.transformer)
        self.enabled = False

    def reset(self) -> None:
        try:
            if self.enabled:
                self.enabled = False
                import cache_dit

                cache_dit.disable_cache(self.pipe)
        finally:
            self.saved.restore()


def apply_cache_dit(
    pipe: Any, config: CacheDitConfig, *, num_steps: int, true_cfg: bool
) -> CacheDitState:
    """Enable DBCache on `pipe` for a run of `num_steps` steps (`true_cfg`: cond and uncond
    passes per step); `reset()` the returned state to remove it."""
    quiet_cache_dit()
    import cache_dit

    state = CacheDitState(pipe)
    try:
        cache_dit.enable_cache(pipe, cache_config=config.to_cache_dit(num_steps, true_cfg))
    except BaseException:
        state.reset()
        raise
    state.enabled = True
    return state


class CacheDitHook(Hook[CacheDitConfig]):
    def apply(self, pipe: Any, call: PipelineCall) -> CacheDitState:
        return apply_cache_dit(pipe, self.config, num_steps=call.num_steps, true_cfg=call.true_cfg)


def installed() -> bool:
    """Whether the cache-dit package is importable (without importing it)."""
    return importlib.util.find_spec("cache_dit") is not None


TECHNIQUE = Technique(
    name="cache_dit",
    config_type=CacheDitConfig,
    hook_type=CacheDitHook,
    skips_steps=True,
    diffusers_hooks=False,
    available=installed,
    unavailable=UNAVAILABLE,
)


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


_QUIETED = False


def quiet_cache_dit() -> None:
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
