"""The HTTP API (`omni-tasks api`, the `api` extra): OpenAI-compatible endpoints and a
job API (progress, cancel, Server-Sent Events, signed webhooks) over the same queues
`.delay()` uses. FastAPI and uvicorn load only here, never with `import omni_tasks`."""

from omni_tasks.api.app import create_app, serve
from omni_tasks.api.webhooks import sign, verify

__all__ = ["create_app", "serve", "sign", "verify"]
