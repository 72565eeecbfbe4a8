"""The config an API app serves: `create_app` keeps it on `app.state`, and handlers read
it from their request, so two apps on two configs can live in one process."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from omni_tasks.config import CoreModuleConfig


def config_of(request: HTTPConnection) -> CoreModuleConfig:
    """The config of the app serving `request`."""
    config: CoreModuleConfig = request.app.state.config
    return config
