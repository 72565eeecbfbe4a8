"""The HTTP API's application: `create_app()` for any ASGI server, `serve()` for
`omni-tasks api`.

Stateless: what a request needs is in Redis (queues, results, progress, previews, job
records, webhook deliveries), so any number of API processes can run against one
Redis, and any of them answers for a job another accepted.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from omni_tasks.api import (
    batch_files,
    batches,
    errors,
    files,
    jobs,
    openai_audio,
    openai_images,
    openai_text,
    page,
    status,
    videos,
)
from omni_tasks.api.hub import ResultHub
from omni_tasks.api.idempotency import caller_of
from omni_tasks.api.middleware import BearerAuth, BodyLimit, CatchAll
from omni_tasks.api.submission import LiveWorkers
from omni_tasks.api.webhooks import WebhookDispatcher
from omni_tasks.config import CoreModuleConfig, get_config, set_config
from omni_tasks.coordination.client import client_for
from omni_tasks.coordination.keyspace import keyspace

#: The environment variable that sets the bearer token (`api.token` in the config too).
TOKEN_ENV = "OMNI_API_TOKEN"


def api_token(config: CoreModuleConfig) -> str | None:
    return os.environ.get(TOKEN_ENV) or config.api.token or None


def create_app(config: CoreModuleConfig | None = None) -> FastAPI:
    """The API on `config` (default: the process's, from config/*.yaml and OMNI_*)."""
    if config is not None:
        set_config(config)
    config = get_config()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub = ResultHub(config.redis_url, app.state.keys)
        await hub.start()
        app.state.hub = hub
        app.state.workers = LiveWorkers(hub, config)
        app.state.webhooks = WebhookDispatcher(hub, config)
        app.state.status = status.StatusCache(app.state.redis, config)
        await app.state.webhooks.start()
        try:
            yield
        finally:
            await app.state.webhooks.stop()
            await hub.stop()

    app = FastAPI(
        title="omni-tasks",
        summary="OpenAI-compatible endpoints and a job API over the omni-tasks queues",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.config = config  # what handlers read (`context.config_of`)
    app.state.keys = keyspace(config.key_prefix)  # `context.keys_of`, the hub's
    app.state.redis = client_for(config)  # the status reads' sync client
    app.state.caller = caller_of(api_token(config))  # scopes Idempotency-Keys
    errors.install(app)
    routers = (openai_images, openai_text, openai_audio, jobs, videos, batch_files, batches, files)
    for module in (*routers, status, page):
        app.include_router(module.router)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        await app.state.hub.redis.ping()
        return JSONResponse({"status": "ok"})

    app.add_middleware(CatchAll)
    app.add_middleware(BodyLimit, limit=int(config.api.max_body_mb * 2**20))
    app.add_middleware(BearerAuth, token=api_token(config))
    return app


def serve(host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run the API with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(
        create_app(),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
