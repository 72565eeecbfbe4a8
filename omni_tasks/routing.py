"""The Celery router: every omni-tasks message gets its queue and priority here.

Plain `.delay()`, `apply_async`, chains and `send_task` by name all pass through
Celery's router, so routing needs nothing special from apps. The policy is the one of
the current config (`create_policy`), so `OmniScheduler.update_config` takes effect on
the next message.
"""

from __future__ import annotations

from typing import Any

from omni_tasks.config import get_config
from omni_tasks.policies import SchedulingPolicy, create_policy

_policy_cache: tuple[int, SchedulingPolicy] | None = None


def current_policy() -> SchedulingPolicy:
    """The policy of the current config (rebuilt only when the config object changes)."""
    global _policy_cache
    config = get_config()
    if _policy_cache is None or _policy_cache[0] != id(config):
        _policy_cache = (id(config), create_policy(config))
    return _policy_cache[1]


class OmniRouter:
    """Routes omni-tasks tasks by request; leaves other tasks to Celery's defaults."""

    def __call__(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: dict[str, Any],
        task: Any = None,
        **_: Any,
    ) -> dict[str, Any] | None:
        from omni_tasks.task_base import OmniTask

        if not isinstance(task, OmniTask):
            from omni_tasks.celery_app import app

            task = app.tasks.get(name)
            if not isinstance(task, OmniTask):
                return None
        request = task.build_request(kwargs or {})  # RequestValidationError: nothing sent
        route = current_policy().route(request, task.stage)
        return {"queue": route.queue, "priority": route.priority}
