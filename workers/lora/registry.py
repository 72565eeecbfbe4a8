"""Where a registered adapter's folder is on this worker.

The config's `loras` maps a name to a folder: absolute (or `~`), or relative to
`models_dir`. A folder that is missing but named like a tiny adapter
(`tiny-flux-lora-<style>`, `tiny-llama-lora-<style>`) is built there on first use, as
the tiny models are; any other missing folder is an error naming the adapter.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from omni_tasks.config import CoreModuleConfig
from omni_tasks.errors import ProcessingError, RequestValidationError
from workers.models import build_tiny_model
from workers.models.atomic import MARKER
from workers.models.tiny_lora import build_tiny_lora, tiny_lora_base

_lock = threading.Lock()
_resolved: dict[tuple[str, str], Path] = {}


def adapter_path(name: str, config: CoreModuleConfig) -> Path:
    """The folder of registered adapter `name` (built first if it is a missing tiny one)."""
    entry = config.loras.get(name)
    if entry is None:
        raise RequestValidationError("lora", f"adapter {name!r} is not in this worker's registry")
    folder = Path(os.path.expanduser(entry))
    if not folder.is_absolute():
        folder = config.models_path() / folder
    with _lock:
        found = _resolved.get((name, str(folder)))
        if found is not None and found.is_dir():
            return found
        found = _locate(name, folder, config)
        _resolved[(name, str(folder))] = found
        return found


def _locate(name: str, folder: Path, config: CoreModuleConfig) -> Path:
    if folder.is_dir() and not (folder / MARKER).exists():
        return folder  # an adapter someone put there (never rebuilt over)
    base = tiny_lora_base(folder.name)
    if base is not None:  # complete already, or built now (atomic: concurrent workers)
        base_dir = build_tiny_model(base, config.models_path() / base)
        return build_tiny_lora(folder.name, folder, base_dir)
    raise ProcessingError(f"adapter {name!r}: folder {folder} does not exist on this worker")
