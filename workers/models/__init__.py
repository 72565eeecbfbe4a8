"""Tiny random-weight models, built from small configs and saved like real checkpoints.

Workers load them with the same `from_pretrained(path)` code that loads production
models, so every line of the real loading path runs on machines without a model hub.
"""

from __future__ import annotations

from pathlib import Path

TINY_MODELS = ("tiny-llama", "tiny-flux")


def build_tiny_model(name: str, path: Path) -> Path:
    """Write tiny model `name` to `path` (atomically: concurrent builders are safe)."""
    if name == "tiny-llama":
        from workers.models.tiny_llama import build_tiny_llama

        return build_tiny_llama(path)
    if name == "tiny-flux":
        from workers.models.tiny_flux import build_tiny_flux

        return build_tiny_flux(path)
    raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}")


def build_tiny_models(root: Path) -> dict[str, Path]:
    """Build every tiny model under `root` (skipping those already there)."""
    return {name: build_tiny_model(name, Path(root) / name) for name in TINY_MODELS}
