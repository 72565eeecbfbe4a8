"""What every step-cache technique shares: parameter specs and their validation, the unit
type the registry holds, and the diffusers cache helpers.

A technique unit (`Technique`) is built from three parts, after diffusers' own hooks:

- a frozen Config dataclass whose fields are the technique's parameters, each declared with
  `int_param` / `float_param` (documented default, inclusive range, one-line doc); the field
  metadata is the parameter table that requests are validated against;
- a Hook: enables the technique on a pipeline for one pipeline call (`Hook.applied`) and
  always resets it afterwards, exceptions included;
- a State (`reset()`): what the technique keeps on the transformer all threads share while
  it is enabled; `reset()` puts that transformer back hook-free.

The four diffusers-based techniques share `DiffusersCacheState`: diffusers keeps their hooks
on the transformer itself (`CacheMixin.enable_cache` / `disable_cache`).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from omni_tasks.errors import ConfigError

# Validated params of one mode: name -> value (int for integer parameters, else float).
Resolved = dict[str, float | int]
_SPEC_KEY = "step_cache_param"


@dataclass(frozen=True)
class Param:
    """One numeric parameter: documented default, kind, inclusive range, one-line doc."""

    default: float | int
    integer: bool
    low: float
    high: float
    doc: str

    def cast(self, value: float) -> float | int:
        return int(value) if self.integer else float(value)

    def check(self, field: str, value: object) -> float | int:
        """`value` cast to this parameter's kind; ConfigError naming `field` if it is not
        a finite number (integral for integer parameters) within the range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(field, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(field, f"must be finite, got {value!r}")
        if self.integer and value != int(value):
            raise ConfigError(field, f"must be an integer, got {value!r}")
        if not self.low <= value <= self.high:
            raise ConfigError(field, f"must be in [{self.low:g}, {self.high:g}], got {value!r}")
        return self.cast(value)


def int_param(default: int, low: int, high: int, doc: str) -> Any:
    """A Config field for an integer parameter (names follow the library's arguments)."""
    return _field(Param(int(default), True, low, high, doc))


def float_param(default: float, low: float, high: float, doc: str) -> Any:
    """A Config field for a real-valued parameter."""
    return _field(Param(float(default), False, low, high, doc))


def _field(spec: Param) -> Any:
    if not spec.low <= spec.default <= spec.high:
        raise ValueError(f"default {spec.default!r} outside [{spec.low:g}, {spec.high:g}]")
    return dataclasses.field(default=spec.default, metadata={_SPEC_KEY: spec})


def param_specs(config_type: type) -> dict[str, Param]:
    """name -> Param of a Config dataclass, in field order."""
    return {f.name: f.metadata[_SPEC_KEY] for f in dataclasses.fields(config_type)}


def validate_params(mode: str, specs: Mapping[str, Param], given: object) -> Resolved:
    """The defaults of `specs`, overridden by the `given` name -> number mapping.

    Raises ConfigError naming `step_cache_params` (not a mapping) or
    `step_cache_params.<name>` (unknown name, not a number, not integral, out of range).
    """
    resolved: Resolved = {name: spec.default for name, spec in specs.items()}
    if not isinstance(given, Mapping):
        raise ConfigError("step_cache_params", "must be a mapping of names to numbers")
    for name, value in given.items():
        field = f"step_cache_params.{name}"
        spec = specs.get(name)
        if spec is None:
            known = ", ".join(specs) or "none"
            raise ConfigError(field, f"not a parameter of mode {mode!r} (known: {known})")
        resolved[name] = spec.check(field, value)
    return resolved


# --- State, Hook and the unit ---------------------------------------------------------------


class State(Protocol):
    """What a technique keeps on the shared transformer while it is enabled."""

    def reset(self) -> None:
        """Put the transformer back hook-free; safe to call more than once."""
        ...


@dataclass(frozen=True)
class PipelineCall:
    """What one pipeline call tells a technique besides its params.

    `num_steps`: denoising steps this call runs; `true_cfg`: the transformer runs twice per
    step (cond, then uncond); `mag_ratios`: MagCache's calibrated ratios, one per step;
    `current_timestep`: the running step's timestep (0-1000) for PAB, by default
    `pipe.current_timestep`.
    """

    num_steps: int
    true_cfg: bool = False
    mag_ratios: Sequence[float] | None = None
    current_timestep: Callable[[], Any] | None = None


ConfigT = TypeVar("ConfigT")


class Hook(ABC, Generic[ConfigT]):
    """Enables one technique, configured by `config`, on a pipeline for one pipeline call."""

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @abstractmethod
    def apply(self, pipe: Any, call: PipelineCall) -> State:
        """Enable the technique on `pipe`; the returned State's `reset()` removes it.
        If enabling fails, nothing is left behind."""

    @contextmanager
    def applied(self, pipe: Any, call: PipelineCall) -> Iterator[State]:
        """The technique enabled for the `with` body; reset afterwards, whatever happens."""
        state = self.apply(pipe, call)
        try:
            yield state
        finally:
            state.reset()


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Technique(Generic[ConfigT]):
    """One step-cache mode: its parameters (the Config), its Hook and what it skips.

    `skips_steps`: skips the whole block stack on some steps (`steps_run` drops below the
    steps); `diffusers_hooks`: built on diffusers' hooks, whose state is kept per
    `transformer.cache_context(name)`; `available`: whether its library is installed,
    `unavailable` the ConfigError message when it is not.
    """

    name: str
    config_type: type[ConfigT]
    hook_type: Callable[[ConfigT], Hook[ConfigT]]
    skips_steps: bool
    diffusers_hooks: bool
    available: Callable[[], bool] = _always
    unavailable: str = ""

    @property
    def params(self) -> dict[str, Param]:
        return param_specs(self.config_type)

    def defaults(self) -> Resolved:
        return {name: spec.default for name, spec in self.params.items()}

    def resolve(self, given: object) -> Resolved:
        """`given` validated, defaults filled in; the Config checks what spans parameters."""
        resolved = validate_params(self.name, self.params, given)
        self.config_type(**resolved)
        return resolved

    def hook(self, params: Mapping[str, float]) -> Hook[ConfigT]:
        """A Hook for resolved `params` (missing names take their defaults)."""
        return self.hook_type(self.config_type(**params))


# --- diffusers helpers ----------------------------------------------------------------------


def enable_diffusers_cache(transformer: Any, config: Any) -> None:
    """`transformer.enable_cache(config)` on a transformer without cache hooks."""
    if transformer.is_cache_enabled:  # left over by a crash in between: start clean
        transformer.disable_cache()
    transformer.enable_cache(config)


def disable_diffusers_cache(transformer: Any) -> None:
    """Clear the hooks' state and remove them; no-op when none are enabled."""
    if transformer.is_cache_enabled:
        transformer._reset_stateful_cache()
        transformer.disable_cache()


class DiffusersCacheState:
    """The State of a diffusers-based technique: its hooks on the shared transformer.

    `enabled` says whether this state put hooks there; `reset()` clears their per-context
    state and removes them.
    """

    def __init__(self, transformer: Any) -> None:
        self.transformer = transformer
        self.enabled = False

    def enable(self, config: Any) -> None:
        try:
            enable_diffusers_cache(self.transformer, config)
        except BaseException:
            self.reset()
            raise
        self.enabled = True

    def reset(self) -> None:
        disable_diffusers_cache(self.transformer)
        self.enabled = False


def apply_diffusers_cache(transformer: Any, config: Any) -> DiffusersCacheState:
    """Enable the diffusers cache `config` on `transformer`; `reset()` the result to undo."""
    state = DiffusersCacheState(transformer)
    state.enable(config)
    return state


def block_stack(transformer: Any) -> list[Any]:
    """The transformer blocks in execution order (Flux: double, then single blocks)."""
    blocks: list[Any] = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks.extend(getattr(transformer, name, None) or [])
    if not blocks:
        raise RuntimeError(f"{type(transformer).__name__} has no transformer blocks")
    return blocks
