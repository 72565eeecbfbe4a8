"""The registries of the configuration: the names requests may use (`loras`, `models`),
their rules, and `Registries`, what request validation checks them against.

Request models check shape and ranges only; an entry point (a task's `build_request`,
`create_*_request`, the HTTP API, the worker handler) builds `Registries` from its
config and passes it as pydantic's validation context (`context()`), so a name the
config does not register is refused naming its field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omni_tasks.errors import ConfigError

if TYPE_CHECKING:
    from omni_tasks.config.schema import CoreModuleConfig

#: Model registry names: they travel in messages and name queues, so hub ids
#: (`org/name`) fit, and nothing kombu or RabbitMQ would read otherwise does.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9._/-]+$")
MAX_MODEL_NAME_CHARS = 128
#: The key of `Registries` in a pydantic validation context.
CONTEXT_KEY = "registries"


@dataclass
class ModelEntry:
    """One model of the config's `models` registry. Both fields are optional: without
    `path` the worker looks for the name under `models_dir`, else takes it for a hub id;
    without `family` the worker reads it from the checkpoint's `model_index.json`."""

    path: str | None = None
    family: str | None = None


@dataclass(frozen=True)
class Registries:
    """The names of the config's registries that request validation checks: the LoRA
    adapters (`loras`). Built at an entry point, passed as the validation context."""

    loras: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: CoreModuleConfig) -> Registries:
        return cls(loras=dict(config.loras))

    def context(self) -> dict[str, Any]:
        """The pydantic validation context that carries these registries."""
        return {CONTEXT_KEY: self}

    @staticmethod
    def of(context: Any) -> Registries | None:
        """The registries a validation context carries; None: shape only."""
        return context.get(CONTEXT_KEY) if isinstance(context, dict) else None


def validate_registry(models: dict[str, ModelEntry], *defaults: str) -> None:
    """`ConfigError` naming `models.<name>` (or `diffusion.model`, a pool's default)
    for a name that cannot name a queue or an entry with a blank field."""
    for name, entry in models.items():
        problem = model_name_problem(name)
        if problem is not None:
            raise ConfigError(f"models.{name}", problem)
        if not isinstance(entry, ModelEntry):
            raise ConfigError(f"models.{name}", "must be a mapping")
        for part in ("path", "family"):
            value = getattr(entry, part)
            if value is not None and not str(value).strip():
                raise ConfigError(f"models.{name}.{part}", "must not be blank (leave it out)")
    for default in defaults:
        if any(c.isspace() or c == ":" for c in default):
            raise ConfigError(
                "diffusion.model",
                f"{default!r} must not contain whitespace or ':' (it names the model's queue)",
            )


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot be a registry name, or None when it can."""
    if not name:
        return "a model name must not be empty"
    if len(name) > MAX_MODEL_NAME_CHARS:
        return f"a model name has at most {MAX_MODEL_NAME_CHARS} characters"
    if not MODEL_NAME_RE.match(name):
        return "a model name may use letters, digits and '.', '_', '/', '-' only"
    return None
