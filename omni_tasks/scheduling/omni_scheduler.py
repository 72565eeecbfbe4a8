"""`OmniScheduler` (alias `CoreScheduler`): the core module's async scheduler API, over
the shared Celery queues.

`schedule_request` enqueues into the shared Redis queues with this scheduler's policy
(queue + level); `process_request` awaits the result (scheduling first if needed);
`get_next_request` answers which of the requests this scheduler scheduled would run
next; queue sizes and counters come from Redis, so they cover every producer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import Any

from celery.result import AsyncResult

from omni_tasks.config import GIB, CacheConfig, CoreModuleConfig, SchedulerConfig
from omni_tasks.coordination import admission
from omni_tasks.coordination.cache_directory import hit_rate
from omni_tasks.coordination.client import OmniRedis, backoff, client_for
from omni_tasks.coordination.counter_window import (
    current_counters,
    record_sample,
    sample_window,
)
from omni_tasks.coordination.depths import total_queued
from omni_tasks.coordination.health import health_of
from omni_tasks.coordination.snapshots import (
    ClusterSnapshot,
    memory_figures,
    model_servers,
    read_snapshot,
    unserved_models,
    worker_resources,
)
from omni_tasks.coordination.stranded import health_issues as stranded_health
from omni_tasks.coordination.stranded import stranded_lists
from omni_tasks.errors import (
    ConfigError,
    CoreModuleError,
    ProcessingError,
    RequestTimeoutError,
    SchedulerError,
)
from omni_tasks.requests import OmniRequest, ProcessingStage
from omni_tasks.scheduling.schedulers import PolicyScheduler, create_scheduler
from omni_tasks.tasks.celery_app import app
from omni_tasks.tasks.context import producer_context
from omni_tasks.tasks.producer import cancel, submit

log = logging.getLogger(__name__)


class OmniScheduler:
    """The scheduler an application awaits: it enqueues with its own policy, awaits
    results, cancels, and reports status, metrics and health for the whole cluster.

    It sends through `omni_tasks.app`: given no `core_config`, it takes that app's
    (`producer_context`), with `config` and `cache_config` replacing their sections.
    """

    def __init__(
        self,
        config: SchedulerConfig | None = None,
        cache_config: CacheConfig | None = None,
        core_config: CoreModuleConfig | None = None,
    ) -> None:
        base = core_config or producer_context(app).config
        self.core_config = replace(
            base, scheduler=config or base.scheduler, cache=cache_config or base.cache
        )
        self.core_config.validate()
        self.config = self.core_config.scheduler
        self.cache_config = self.core_config.cache
        self.scheduler: PolicyScheduler = self._create_scheduler()
        self._running = False
        self._pending: dict[str, tuple[OmniRequest, AsyncResult]] = {}
        self._background: list[asyncio.Task[None]] = []
        self._stats: dict[str, Any] = {
            "total_requests": 0,
            "processed_requests": 0,
            "failed_requests": 0,
            "average_processing_time": 0.0,
        }

    def _create_scheduler(self) -> PolicyScheduler:
        return create_scheduler(self.core_config)

    # Core operations.
    async def schedule_request(self, request: OmniRequest) -> bool:
        """Enqueue `request`; False if this scheduler already holds it."""
        if request.request_id in self._pending:
            return False
        try:
            if not await self.scheduler.schedule_request(request):
                return False
            # Admitted atomically with the pool's count, this scheduler's limit applying.
            with admission.max_queue_size(self.config.max_queue_size):
                result = await asyncio.to_thread(submit, request, policy=self.scheduler.policy)
        except CoreModuleError:
            self._stats["failed_requests"] += 1
            await self.scheduler.remove_request(request.request_id)
            raise
        except Exception as exc:
            self._stats["failed_requests"] += 1
            await self.scheduler.remove_request(request.request_id)
            raise SchedulerError(f"Failed to schedule request: {exc}") from exc
        self._pending[request.request_id] = (request, result)
        self._stats["total_requests"] += 1
        return True

    async def get_next_request(self) -> OmniRequest | None:
        """The next of this scheduler's requests still waiting in the queues."""
        while True:
            request = await self.scheduler.get_next_request()
            if request is None:
                return None
            entry = self._pending.get(request.request_id)
            if entry and await asyncio.to_thread(lambda r=entry[1]: r.state) == "PENDING":
                request.update_processing_stage(ProcessingStage.PREPROCESSING)
                return request

    async def process_request(self, request: OmniRequest, timeout: float | None = None) -> Any:
        """Schedule `request` if needed and await its result (a JSON dict).

        Only this request's result: its id re-used for a different request raises
        `RequestConflictError` (nothing is enqueued); the same request sent again under
        its id is an idempotent repeat, answered with the result it already has.
        """
        if request.request_id not in self._pending:
            await self.schedule_request(request)
        _, result = self._pending[request.request_id]
        limit = timeout or float(request.timeout_s or self.core_config.request_timeout) * 2
        started = time.time()
        try:
            value = await self._await_result(result, limit)
            answered = value.get("request_id") if isinstance(value, dict) else None
            if answered not in (None, request.request_id):
                raise ProcessingError(f"request {request.request_id} got {answered}'s result")
        except Exception as exc:
            request.add_error(str(exc))
            request.update_processing_stage(ProcessingStage.FAILED)
            self._stats["failed_requests"] += 1
            raise
        finally:
            self._pending.pop(request.request_id, None)
        self._update_stats(time.time() - started)
        request.update_processing_stage(ProcessingStage.COMPLETED)
        return value

    async def _await_result(self, result: AsyncResult, limit: float) -> Any:
        backend = result.backend
        deadline = time.monotonic() + limit
        for interval in backoff():
            meta = await asyncio.to_thread(backend.get_task_meta, result.id)
            status = meta.get("status")
            if status == "SUCCESS":
                return meta.get("result")
            if status in ("FAILURE", "REVOKED", "REJECTED"):
                raise ProcessingError(
                    f"Failed to process request {result.id}: {meta.get('result')}"
                )
            if time.monotonic() >= deadline:
                raise RequestTimeoutError(f"request {result.id} not done after {limit:.0f}s")
            await asyncio.sleep(interval)

    async def remove_request(self, request_id: str) -> bool:
        """Cancel a request (revoke); True if this scheduler knew it."""
        entry = self._pending.pop(request_id, None)
        known = await self.scheduler.remove_request(request_id) or entry is not None
        kind = entry[0].request_type if entry else None
        await asyncio.to_thread(cancel, request_id, kind)
        if entry:
            entry[0].update_processing_stage(ProcessingStage.CANCELLED)
        return known

    @property
    def redis(self) -> OmniRedis:
        """The client of this scheduler's coordination Redis."""
        return client_for(self.core_config)

    def get_queue_size(self) -> int:
        return total_queued(self.redis, self.core_config)

    def get_processed_count(self) -> int:
        return read_snapshot(self.redis, self.core_config).processed

    # Configuration.
    def update_config(self, new_config: SchedulerConfig) -> None:
        """Switch this scheduler's policy, and that of the app it sends through: the
        router reads the app's config (`producer_context`), so `.delay()`, `send_task`
        and chains follow from the next message on."""
        try:
            new_config.validate()
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError("scheduler", f"Failed to update config: {exc}") from exc
        self.core_config = replace(self.core_config, scheduler=new_config)
        self.config = new_config
        context = producer_context(app)
        context.switch_to(replace(context.config, scheduler=new_config))
        new = self._create_scheduler()
        new.adopt(self.scheduler)
        self.scheduler = new

    def get_config(self) -> SchedulerConfig:
        return self.config

    def update_cache_config(self, new_config: CacheConfig) -> None:
        new_config.validate()
        self.cache_config = new_config
        self.core_config = replace(self.core_config, cache=new_config)

    # Lifecycle.
    async def start(self) -> None:
        if self._running:
            raise SchedulerError("Scheduler is already running")
        self._running = True
        self._background.append(asyncio.create_task(self._background_cleanup()))
        if self.core_config.enable_metrics or self.core_config.enable_health_checks:
            self._background.append(asyncio.create_task(self._background_sampling()))

    async def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: wait (bounded) for this scheduler's requests to finish."""
        if not self._running:
            return
        self._running = False
        deadline = time.monotonic() + (timeout or self.core_config.request_timeout)
        while self._pending and time.monotonic() < deadline:
            await self._drop_finished()
            await asyncio.sleep(0.05)
        await self._cancel_background()

    async def shutdown(self) -> None:
        """Stop at once; requests already queued stay queued for the workers."""
        self._running = False
        await self._cancel_background()
        self._pending.clear()

    async def _background_cleanup(self) -> None:
        while self._running:
            await asyncio.sleep(self.core_config.cleanup_interval)
            await self._drop_finished()

    async def _background_sampling(self) -> None:
        """Sample the cluster's counters every `metrics_interval`, so the recent window
        has points even when nobody asks; log health issues when they change."""
        reported: list[str] = []
        while self._running:
            try:
                if self.core_config.enable_health_checks:
                    issues = (await asyncio.to_thread(self.get_health_status))["issues"]
                    if issues != reported:
                        for issue in issues:
                            log.warning("health: %s", issue)
                        reported = issues
                else:
                    await asyncio.to_thread(self._window)
            except Exception:  # sampling must not stop the scheduler
                log.warning("metrics sampling failed", exc_info=True)
            await asyncio.sleep(self.core_config.metrics_interval)

    async def _drop_finished(self) -> None:
        for request_id, (_, result) in list(self._pending.items()):
            if await asyncio.to_thread(lambda r=result: r.ready()):
                self._pending.pop(request_id, None)
                await self.scheduler.remove_request(request_id)

    async def _cancel_background(self) -> None:
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background.clear()

    # Monitoring.
    def get_status(self) -> dict[str, Any]:
        snap = read_snapshot(self.redis, self.core_config)
        return {
            "running": self._running,
            "queue_size": snap.queued,
            "queues": snap.queues,
            "processed_requests": snap.processed,
            "failed_requests": snap.failed,
            "cache_hit_rate": self._cache_hit_rate(),
            "memory_usage": snap.dit_cache_bytes / GIB,
            "resource_status": self._resource_status(snap),
            "pools": {q: vars(p) for q, p in snap.pools.items()},
            "models": self._models(snap),
            "stats": self._stats.copy(),
        }

    def get_metrics(self) -> dict[str, float]:
        """Cluster-wide figures over the recent window (every process shares its
        samples): requests done per second, and their mean queue + run time."""
        snap = read_snapshot(self.redis, self.core_config)
        window = sample_window(self.redis, snap, self.core_config)
        done = window.processed
        spent = sum(p.run_s_sum + p.queued_s_sum for p in window.pools.values())
        used, budget = memory_figures(snap)
        return {
            "throughput": window.throughput,
            "window_seconds": window.seconds,
            "average_latency": spent / done if done else 0.0,
            "average_processing_time": self._stats["average_processing_time"],
            "cache_hit_rate": self._cache_hit_rate(),
            "memory_utilization": used / budget if budget else 0.0,
            "queue_utilization": snap.queued / self.config.max_queue_size,
        }

    def get_health_status(self) -> dict[str, Any]:
        snap = read_snapshot(self.redis, self.core_config)
        window = sample_window(self.redis, snap, self.core_config)
        issues, advice = health_of(snap, self.core_config, window)
        stranded = stranded_lists(self.redis, self.core_config, snap.workers)
        more_issues, more_advice = stranded_health(stranded)
        issues, advice = issues + more_issues, advice + more_advice
        return {
            "healthy": not issues,
            "issues": issues,
            "recommendations": advice,
            "stranded": stranded,
            # Registered diffusion models no live worker serves: their requests wait
            # (an issue once some do).
            "unserved_models": unserved_models(snap),
        }

    def _window(self) -> None:
        """Add a sample of the counters now to the window's series."""
        client, config = self.redis, self.core_config
        record_sample(client, current_counters(client, read_snapshot(client, config), config))

    @staticmethod
    def _models(snap: ClusterSnapshot) -> dict[str, dict[str, Any]]:
        """Each diffusion model registered or served: the live workers serving it and
        what waits in its queue, per level."""
        return {
            model: {"workers": hosts, "queued": snap.models.get(model, {})}
            for model, hosts in sorted(model_servers(snap).items())
        }

    @staticmethod
    def _resource_status(snap: ClusterSnapshot) -> dict[str, Any]:
        """Each live worker's heartbeat, its `resource_status` parsed (None without one),
        and the device bytes summed over the workers that report them."""
        workers = [{**w, "resource_status": worker_resources(w)} for w in snap.workers]
        used, budget = memory_figures(snap)
        return {"workers": workers, "used_bytes": used, "budget_bytes": budget}

    def _cache_hit_rate(self) -> float:
        """DiT cache hits over lookups in the diffusion pool (all kinds of entries)."""
        return hit_rate(self.redis, self.core_config.diffusion.queue)[0]

    def _update_stats(self, seconds: float) -> None:
        n = self._stats["processed_requests"] + 1
        avg = self._stats["average_processing_time"]
        self._stats["processed_requests"] = n
        self._stats["average_processing_time"] = avg + (seconds - avg) / n


CoreScheduler = OmniScheduler
