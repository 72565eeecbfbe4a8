"""Where the configuration comes from, and the one copy a process uses.

Sources, later wins: the dataclass defaults, `config/default.yaml` (or the file named
by `OMNI_CONFIG`), then `OMNI_*` environment variables. Nested fields use a double
underscore: `OMNI_SCHEDULER__MAX_QUEUE_SIZE=50`, `OMNI_AR__ENGINE=transformers`.
Values are coerced by the dataclass field types, so a new field needs no loader change.
Mappings come from the environment as YAML flow mappings or JSON:
`OMNI_LORAS='{"ink": "loras/ink"}'`, `OMNI_MODELS='{"flux-b": {"path": "/models/flux"}}'`.
A renamed key (`RENAMED_KEYS`) is still read under its old name, from every source, and
a warning names the new one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from omni_tasks.config.schema import CoreModuleConfig
from omni_tasks.errors import ConfigError

DEFAULT_CONFIG_FILE = Path(__file__).resolve().parents[2] / "config" / "default.yaml"
#: Keys the configuration renamed (docs/glossary.md: memory is in GiB, `*_gib`): the
#: old dotted key -> the new one, under the same section.
RENAMED_KEYS = {
    "max_memory_gb": "max_memory_gib",
    "cache.max_memory_gb": "cache.max_memory_gib",
    "lora.memory_gb": "lora.memory_gib",
}

logger = logging.getLogger(__name__)


def load_config(
    path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None
) -> CoreModuleConfig:
    """Load defaults, then the YAML file (`OMNI_CONFIG` or the embedded default), then env."""
    env = dict(os.environ if env is None else env)
    file = Path(path or env.get("OMNI_CONFIG") or DEFAULT_CONFIG_FILE)
    data = read_yaml(file) if file.exists() or path or env.get("OMNI_CONFIG") else {}
    data = renamed_keys(data, str(file))
    data = apply_env(data, env, prefix="OMNI_", skip={"OMNI_CONFIG"})
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> CoreModuleConfig:
    """A validated config from a mapping shaped like the YAML file."""
    config = build_dataclass(CoreModuleConfig, renamed_keys(data, "config"), "")
    config.validate()
    return config


class _ProcessConfig:
    """The configuration this process runs with, loaded on first use."""

    def __init__(self) -> None:
        self.current: CoreModuleConfig | None = None


_process = _ProcessConfig()


def get_config() -> CoreModuleConfig:
    """The process-wide configuration, loaded once on first use."""
    if _process.current is None:
        _process.current = load_config()
    return _process.current


def set_config(config: CoreModuleConfig) -> None:
    """Replace the process-wide configuration (after validating it)."""
    config.validate()
    _process.current = config


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a `ConfigError`."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError("OMNI_CONFIG", f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError("OMNI_CONFIG", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("OMNI_CONFIG", f"{path} must hold a mapping at the top level")
    return data


def apply_env(
    data: dict[str, Any], env: dict[str, str], prefix: str, skip: set[str]
) -> dict[str, Any]:
    """Overlay `PREFIX_SECTION__FIELD=value` variables onto `data` (values stay strings).

    Top-level names that match no field are ignored (other tools share the prefix);
    a nested name is checked against the section later, so a typo there is an error.
    """
    top_fields = {f.name for f in dataclasses.fields(CoreModuleConfig)}
    merged = _deep_copy(data)
    for name, value in sorted(env.items()):
        if not name.startswith(prefix) or name in skip:
            continue
        parts = name[len(prefix) :].lower().split("__")
        new = RENAMED_KEYS.get(".".join(parts))
        if new is not None:
            parts = new.split(".")
            _warn_renamed(name, prefix + "__".join(parts).upper())
        if parts[0] not in top_fields:
            continue
        node = merged
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return merged


def renamed_keys(data: dict[str, Any], source: str) -> dict[str, Any]:
    """`data` with every renamed key under its new name; where both are given, the new
    one wins. Each old key found is logged, naming `source` and the new key."""
    merged = _deep_copy(data)
    for old, new in RENAMED_KEYS.items():
        *sections, leaf = old.split(".")
        node: Any = merged
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        node.setdefault(new.rsplit(".", 1)[-1], value)
        _warn_renamed(f"{source}: {old}", new)
    return merged


def _warn_renamed(old: str, new: str) -> None:
    logger.warning("DeprecationWarning: %s is deprecated, use %s (the same value)", old, new)


def build_dataclass(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from a mapping, coercing each value to its field type."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(path or cls.__name__, f"must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(_join(path, unknown[0]), f"unknown field; known: {sorted(known)}")
    kwargs = {name: coerce(hints[name], value, _join(path, name)) for name, value in data.items()}
    return cls(**kwargs)


def coerce(tp: Any, value: Any, path: str) -> Any:
    """Coerce a YAML or environment value to type `tp`, or raise `ConfigError(path)`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        return coerce(args[0], value, path)
    if dataclasses.is_dataclass(tp):
        # An entry left empty (`models: {qwen: }` in YAML) takes every default.
        return build_dataclass(tp, {} if value is None else value, path)
    if isinstance(tp, type) and issubclass(tp, Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(str(value).lower())
        except ValueError:
            choices = [m.value for m in tp]
            raise ConfigError(path, f"{value!r} is not one of {choices}") from None
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if isinstance(value, str):
            value = _parse_mapping(value, path)
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {value!r}")
        return {
            coerce(key_tp, k, path): coerce(val_tp, v, _join(path, str(k)))
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(path, f"{value!r} is not a boolean")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(path, f"{value!r} is not a number")
        try:
            number = float(value) if tp is float else _to_int(value)
        except (TypeError, ValueError):
            raise ConfigError(path, f"{value!r} is not a valid {tp.__name__}") from None
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(path, f"must be a string, got {value!r}")
        return str(value)
    return value


def _to_int(value: Any) -> int:
    """An integer, from an int, an integral float, or text of either ("30", "30.0")."""
    if isinstance(value, str) and "." in value:
        value = float(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(value)


def _parse_mapping(text: str, path: str) -> Any:
    """Env values for mappings are YAML flow mappings: `{high: 3, normal: 1, low: 0.3}`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(path, f"{text!r} is not a mapping") from None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}
