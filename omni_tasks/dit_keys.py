"""The DiT cache keys of a request, computed the same way by producers and workers.

- embeddings: what the text encoders see (model, prompt, negative prompt): a new seed
  of a known prompt skips the encoders;
- latents: everything that determines the denoised latents (`generate_cache_key()`
  parts, the model, and the step-cache mode and parameters in force): an exact repeat
  skips denoising and only decodes.
Defaults the request leaves open (model, step cache) come from the pool's config, so a
producer and a worker with the same config agree on the key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from omni_tasks.config import CoreModuleConfig
from omni_tasks.requests import OmniRequest

ENCODER_SETTINGS = "flux-clip77-t5-512"  # what the pipeline's encoders are run with


@dataclass(frozen=True)
class DiTKeys:
    embeddings: str
    latents: str

    def all(self) -> list[str]:
        """Most valuable first (an exact repeat beats a known prompt)."""
        return [self.latents, self.embeddings]


def _digest(kind: str, parts: dict[str, Any]) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return f"{kind}:{hashlib.sha256(text.encode()).hexdigest()}"


def step_cache_of(request: OmniRequest, config: CoreModuleConfig) -> tuple[str, dict[str, float]]:
    mode = request.step_cache or config.diffusion.step_cache
    params = request.step_cache_params
    if params is None:
        params = config.diffusion.step_cache_params if mode == config.diffusion.step_cache else {}
    return mode, dict(params)


def dit_keys(request: OmniRequest, config: CoreModuleConfig, prompt: str | None = None) -> DiTKeys:
    """Keys for `request`; `prompt` overrides the prompt (a multimodal DiT stage)."""
    model = request.model or config.diffusion.model
    text = request.prompt if prompt is None else prompt
    embeddings = _digest(
        "emb",
        {
            "model": model,
            "prompt": text,
            "negative_prompt": request.negative_prompt,
            "encoders": ENCODER_SETTINGS,
        },
    )
    mode, params = step_cache_of(request, config)
    parts = request.cache_key_parts()
    parts.update(
        model=model, prompt=text, step_cache=mode, step_cache_params=params, type="dit"
    )  # IMAGE/DIFFUSION/MULTIMODAL alike: the same latents
    if request.image is None:
        parts.pop("strength", None)
    for text_only in ("max_tokens", "temperature", "top_p", "stop"):
        parts.pop(text_only, None)
    return DiTKeys(embeddings=embeddings, latents=_digest("lat", parts))
