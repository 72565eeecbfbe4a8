"""MagCache ratios of one loaded checkpoint, by (steps, width, height), calibrated on demand.

The ratios are a property of the checkpoint and the schedule, not of a request: they are
calibrated once per key with fixed inputs, so every cached image is the same whichever
request happened to come first, and kept for the engine's lifetime (or passed in from an
earlier engine). Calibration runs the shared transformer, so it runs under the engine's
transformer lock, which the caller holds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from workers.engines import step_cache
from workers.engines.base import ImageParams
from workers.engines.diffusion.hooks import Request, TransformerHooks
from workers.engines.diffusion.phases import PromptEncoder, request_pipeline

MAGCACHE_CALIBRATION_PROMPT = "a detailed photo of a city street at sunset"
MAGCACHE_CALIBRATION_SEED = 0
MAGCACHE_CALIBRATION_GUIDANCE = 3.5

RatioKey = tuple[int, int, int]


class MagCacheRatios:
    """Calibrated ratios of the full schedule, by (steps, width, height)."""

    def __init__(
        self,
        encoder: PromptEncoder,
        hooks: TransformerHooks,
        known: Mapping[RatioKey, Sequence[float]] | None = None,
    ) -> None:
        self._encoder = encoder
        self._hooks = hooks
        self._ratios: dict[RatioKey, list[float]] = {
            tuple(key): [float(r) for r in ratios] for key, ratios in (known or {}).items()
        }

    def copy(self) -> dict[RatioKey, list[float]]:
        return {key: list(ratios) for key, ratios in self._ratios.items()}

    def get_locked(self, request: Request, steps: int, width: int, height: int) -> list[float]:
        """The ratios for this key; calibrates now if needed (transformer lock held)."""
        key = (steps, width, height)
        ratios = self._ratios.get(key)
        if ratios is None:
            start = time.perf_counter()
            ratios = self._calibrate_locked(request, steps, width, height)
            request.calibrate_s = time.perf_counter() - start
            self._ratios[key] = ratios
        return ratios

    def _calibrate_locked(
        self, request: Request, steps: int, width: int, height: int
    ) -> list[float]:
        """diffusers' MagCache calibration: one uncached run with fixed inputs.

        `request` (the one that needs the ratios) only bounds the run's time: the hooks
        must not count these steps for it.
        """
        family = self._encoder.family
        pipe = request_pipeline(family.pipe, family.pipeline_class())
        params = ImageParams(
            width=width,
            height=height,
            steps=steps,
            guidance=MAGCACHE_CALIBRATION_GUIDANCE,
            seed=MAGCACHE_CALIBRATION_SEED,
        )
        embeds = self._encoder.encode(MAGCACHE_CALIBRATION_PROMPT, params)

        def check(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            self._hooks.check(request)
            return tensors

        transformer = pipe.transformer
        with self._hooks.serving(None):
            step_cache.enable_diffusers_cache(
                transformer, step_cache.magcache_calibration_config(steps)
            )
            try:
                ratios = step_cache.record_magcache_ratios(transformer)
                pipe(**self._encoder.denoise_kwargs(embeds, params, None, check))
            finally:
                step_cache.disable_diffusers_cache(transformer)
        if len(ratios) != steps:
            raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {steps} steps")
        return ratios
