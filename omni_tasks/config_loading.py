"""Turning YAML and environment strings into typed config dataclasses.

Kept apart from `config.py` so the dataclasses read like the seed. Coercion is by the
dataclass field types, so a new config field needs no loader change.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from omni_tasks.errors import ConfigError


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
    from omni_tasks.config import CoreModuleConfig

    top_fields = {f.name for f in dataclasses.fields(CoreModuleConfig)}
    merged = _deep_copy(data)
    for name, value in sorted(env.items()):
        if not name.startswith(prefix) or name in skip:
            continue
        parts = name[len(prefix) :].lower().split("__")
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
        return build_dataclass(tp, value, path)
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
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(float(value)) if isinstance(value, str) and "." in value else int(value)


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
