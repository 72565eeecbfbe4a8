"""Per-request LoRA adapters, producer side: the request field, its canonical form and
the names the Redis directory and counters use.

A request names adapters from the config's registry (`loras: {name: folder}`), never by
path: `lora=["watercolor", {"name": "ink", "scale": 0.5}]`. A plain name means scale
1.0. The registry is checked where a request enters (the producer before anything is
enqueued, the worker again), through the `Registries` of the validation context
(`omni_tasks.config.registry`), so an unknown name is refused naming the field
(`lora.0.name`). No torch here: the workers load the adapters (`workers.lora`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from omni_tasks.config import Registries
from omni_tasks.vocabulary import valid_adapter_name

#: At most this many adapters in one request; a scale is within +-MAX_SCALE.
MAX_ADAPTERS = 4
MAX_SCALE = 8.0
#: The prefix of an adapter's entry in the Redis cache directory (beside DiT cache keys).
DIRECTORY_PREFIX = "lora:"

#: The canonical adapter set of a request: (name, scale) pairs sorted by name. LoRA deltas
#: add up, so the order a request lists them in changes nothing.
AdapterSet = tuple[tuple[str, float], ...]


class LoraRef(BaseModel):
    """One adapter a request uses: a registry name and the scale of its delta."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(strict=True, min_length=1, max_length=64)]
    scale: Annotated[float, Field(strict=True, allow_inf_nan=False)] = 1.0

    @model_validator(mode="before")
    @classmethod
    def _plain_name(cls, data: Any) -> Any:
        """A plain string is the name, at scale 1.0."""
        return {"name": data} if isinstance(data, str) else data

    @field_validator("scale", mode="before")
    @classmethod
    def _int_scale(cls, value: Any) -> Any:
        """JSON has one number type: 1 is as good a scale as 1.0 (a bool is not)."""
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    @field_validator("scale")
    @classmethod
    def _scale_bounded(cls, value: float) -> float:
        if abs(value) > MAX_SCALE:
            raise ValueError(f"must be within -{MAX_SCALE:g} and {MAX_SCALE:g}")
        return value

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str, info: ValidationInfo) -> str:
        """A valid name; registered, when the context carries the registries."""
        if not valid_adapter_name(value):
            raise ValueError("letters, digits, '_', '.', '-' only (not first), at most 64")
        registries = Registries.of(info.context)
        if registries is not None:
            check_registered(value, registries.loras)
        return value


def check_registered(name: str, registry: Mapping[str, str]) -> None:
    """ValueError unless `name` is in the registry (the message lists what is)."""
    if name not in registry:
        known = ", ".join(sorted(registry)) or "none (the config's `loras` is empty)"
        raise ValueError(f"unknown adapter {name!r}; registered: {known}")


def check_unique(refs: Sequence[LoraRef]) -> None:
    """ValueError when a request names an adapter twice (its scales would be ambiguous)."""
    names = [r.name for r in refs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"names {twice[0]!r} more than once; give one scale per adapter")


def adapter_set(refs: Iterable[LoraRef]) -> AdapterSet:
    """The canonical (name, scale) set of `refs`, as cache keys and batch keys use it."""
    return tuple(sorted((r.name, float(r.scale)) for r in refs))


def directory_key(name: str, model: str) -> str:
    """The adapter's key in the cache directory: which diffusion worker has it loaded
    on `model` (the model the worker serves, its `diffusion.model`).
    The key names the model, so a worker serving another model that holds the same
    adapter attracts none of this model's requests."""
    return f"{DIRECTORY_PREFIX}{model}:{name}"


def directory_keys(refs: Iterable[LoraRef], model: str) -> list[str]:
    """Directory keys of a request's adapters on `model`, in the order it lists them."""
    return [directory_key(r.name, model) for r in refs]
