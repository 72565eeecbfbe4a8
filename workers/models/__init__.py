"""Tiny random-weight models, built from small configs and saved like real checkpoints.

Workers load them with the same `from_pretrained(path)` code that loads production
models, so every line of the real loading path runs on machines without a model hub.
A missing tiny model is built on first use (`workers.runtime.resolve_model`).
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: Tiny model name -> (module, builder) under `workers.models`.
_BUILDERS = {
    "tiny-llama": ("tiny_llama", "build_tiny_llama"),
    "tiny-flux": ("tiny_flux", "build_tiny_flux"),
    "tiny-sd3": ("tiny_sd3", "build_tiny_sd3"),
    "tiny-qwen-image": ("tiny_qwen_image", "build_tiny_qwen_image"),
    "tiny-qwen-image-edit": ("tiny_qwen_image", "build_tiny_qwen_image_edit"),
    "tiny-sana": ("tiny_sana", "build_tiny_sana"),
    "tiny-wan": ("tiny_wan", "build_tiny_wan"),
    "tiny-wan-i2v": ("tiny_wan", "build_tiny_wan_i2v"),
    "tiny-stable-audio": ("tiny_stable_audio", "build_tiny_stable_audio"),
    "tiny-tts": ("tiny_tts", "build_tiny_tts"),
}
TINY_MODELS = tuple(_BUILDERS)


def build_tiny_model(name: str, path: Path) -> Path:
    """Write tiny model `name` to `path` (atomically: concurrent builders are safe)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}")
    module, builder = _BUILDERS[name]
    build = getattr(importlib.import_module(f"workers.models.{module}"), builder)
    return Path(build(Path(path)))


def build_tiny_models(root: Path) -> dict[str, Path]:
    """Build every tiny model under `root` (skipping those already there)."""
    return {name: build_tiny_model(name, Path(root) / name) for name in TINY_MODELS}
