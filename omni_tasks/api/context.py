"""What an API app serves with: `create_app` keeps its config and `KeySpace` on
`app.state`, and handlers read them from their request, so two apps on two configs can
live in one process."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from omni_tasks.config import CoreModuleConfig, Registries
from omni_tasks.coordination.keyspace import KeySpace


def config_of(request: HTTPConnection) -> CoreModuleConfig:
    """The config of the app serving `request`."""
    config: CoreModuleConfig = request.app.state.config
    return config


def keys_of(request: HTTPConnection) -> KeySpace:
    """The keys of the app serving `request` (under its config's `key_prefix`)."""
    keys: KeySpace = request.app.state.keys
    return keys


def registries_of(request: HTTPConnection) -> Registries:
    """The registries a request to this app is checked against: its config's, never
    the process's (its LoRA names, say)."""
    return Registries.from_config(config_of(request))
