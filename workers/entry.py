"""The worker side's entry point, imported by Celery in worker processes only (the app's
`imports` setting): connects the lifecycle hooks and the remote-control commands, and
registers the handler that runs each task.

Nothing else registers them: the rest of `workers` imports without touching the
process-wide app, so a test or tool may import a worker module in an application
process."""

from omni_tasks.tasks import app
from workers.handlers import register_handlers
from workers.lifecycle import control, hooks

register_handlers(app)

__all__ = ["control", "hooks"]
