"""The task class every omni-tasks task uses, on both sides of the queue.

Producer side, `apply_async` (and so `.delay`) validates the kwargs into an
`OmniRequest` before anything is sent and uses the request id as the task id; the
router then picks the queue and priority. Worker side, `execute` trusts nothing: for a
message that came back it checks cancellation and caps redeliveries (a message that
keeps killing workers), validates again (rejecting and recording what does not parse),
runs the stage on the worker's engine, hands the message back if the engine is
shutting down, and counts the outcome for monitoring.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject

from omni_tasks import keys
from omni_tasks.config import get_config
from omni_tasks.counters import counters
from omni_tasks.errors import EngineStoppedError, ProcessingError, RequestValidationError
from omni_tasks.lua import ADMIT, script
from omni_tasks.policies import Stage
from omni_tasks.redis_client import get_redis
from omni_tasks.rejections import record_rejection
from omni_tasks.requests import OmniRequest, RequestType, request_from_task_kwargs

DELIVERY_KEY_TTL_S = 7 * 86400


class OmniTask(Task):
    """Base of the omni-tasks tasks; `request_type` and `stage` are set per task."""

    abstract = True
    typing = False  # the request model validates (and names the bad field)
    request_type: RequestType | None = None
    stage: Stage = "ar"

    # Producer side.
    def request_type_for(self, kwargs: dict[str, Any]) -> RequestType:
        if self.request_type is None:
            raise NotImplementedError("tasks without a fixed request_type decide per message")
        return self.request_type

    def build_request(self, kwargs: dict[str, Any]) -> OmniRequest:
        if not isinstance(kwargs, dict):
            raise RequestValidationError("kwargs", "request fields must be keyword arguments")
        return request_from_task_kwargs(self.request_type_for(kwargs), kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        **options: Any,
    ) -> Any:
        if args and not self.takes_previous_result:
            raise RequestValidationError("args", "pass request fields as keyword arguments")
        request = self.build_request(kwargs or {})
        return super().apply_async(
            args, request.to_message(), task_id=task_id or request.request_id, **options
        )

    #: True for a chain's later stage, which receives the previous stage's result.
    takes_previous_result = False

    # Worker side.
    def execute(
        self,
        kwargs: dict[str, Any],
        run: Callable[[OmniRequest], dict[str, Any]],
    ) -> dict[str, Any]:
        started = time.time()
        task_id = self.request.id or ""
        pool = self.stage_pool()
        client = get_redis()
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        if redelivered:
            self._admit_redelivery(client, task_id, kwargs, pool)
        try:
            request = self.build_request(kwargs)
        except RequestValidationError as exc:
            record_rejection(str(exc), task_id=task_id, task_name=self.name, pool=pool, body=kwargs)
            client.hincrby(keys.stats(pool), "failed", 1)
            raise
        try:
            result = run(request)
        except EngineStoppedError:
            # A warm shutdown: give the message back; the credit cancels the count the
            # redelivered message will add when it starts again.
            client.decr(keys.deliveries(task_id))
            raise Reject("worker shutting down", requeue=True) from None
        except Exception:
            client.hincrby(keys.stats(pool), "failed", 1)
            raise
        run_s = time.time() - started
        timings = result.setdefault("timings", {})
        timings.setdefault("queued_s", round(max(0.0, started - request.created_at), 6))
        timings.setdefault("run_s", round(run_s, 6))
        timings.setdefault("started_at", round(started, 6))
        counters.add_success(pool, run_s, timings["queued_s"])
        if redelivered:
            client.delete(keys.deliveries(task_id))
        return result

    def stage_pool(self) -> str:
        config = get_config()
        return config.ar.queue if self.stage == "ar" else config.diffusion.queue

    def _admit_redelivery(self, client: Any, task_id: str, kwargs: Any, pool: str) -> None:
        """A message that came back (worker died, shutdown, visibility timeout): skip it
        if it was cancelled meanwhile; refuse it after `max_redeliveries` returns.

        First deliveries skip this round trip: Celery's revoked list covers them (and
        workers load the Redis revocations when they start).
        """
        revoked, returns = script(client, ADMIT)(
            keys=[keys.revoked(task_id), keys.deliveries(task_id)], args=[DELIVERY_KEY_TTL_S]
        )
        if revoked:
            self.backend.mark_as_revoked(task_id, "cancelled before it ran", request=self.request)
            raise Ignore()
        cap = get_config().max_redeliveries
        if int(returns) > cap:
            reason = f"redelivered {returns} times (max_redeliveries={cap}); giving up"
            record_rejection(reason, task_id=task_id, task_name=self.name, pool=pool, body=kwargs)
            client.hincrby(keys.stats(pool), "failed", 1)
            raise ProcessingError(reason)
