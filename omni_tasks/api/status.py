"""`GET /v1/status`: the cluster at a glance, for the operations page and for scripts.

One read of the cluster (`coordination.snapshots.read_snapshot`) gives the queues per
pool and priority level, the live workers and their heartbeats, and the per-pool
counters; health adds its issues, the stranded lists and the recent window. Each pool's
waiting messages are also summed per priority class: a level belongs to the class whose
requests start at the highest level not above it under the current scheduling policy
(`class_levels`). Under `fifo` every message waits at level 0 and no class can be told
from another: they count as `normal`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from omni_tasks.config import PRIORITY_CLASSES, CoreModuleConfig, Registries
from omni_tasks.coordination.cache_directory import adapter_stats, hit_rate
from omni_tasks.coordination.counter_window import sample_window
from omni_tasks.coordination.health import health_of
from omni_tasks.coordination.rejections import list_rejections
from omni_tasks.coordination.snapshots import (
    ClusterSnapshot,
    model_servers,
    read_snapshot,
    worker_resources,
)
from omni_tasks.coordination.stranded import health_issues as stranded_health
from omni_tasks.coordination.stranded import stranded_lists
from omni_tasks.requests import create_text_request
from omni_tasks.scheduling.policies import create_policy

router = APIRouter()

#: How many of the newest rejected messages the status shows.
RECENT_REJECTED = 10
#: How often one API process reads the cluster at most, however many pages poll it.
STATUS_TTL_S = 1.0


def class_levels(config: CoreModuleConfig) -> dict[str, int]:
    """The level (0 highest) a fresh request of each priority class starts at."""
    policy, registries = create_policy(config), Registries.from_config(config)
    return {
        c: policy.level(create_text_request("x", priority=c, registries=registries), "ar")
        for c in PRIORITY_CLASSES
    }


def by_class(levels: dict[int, int], starts: dict[str, int]) -> dict[str, int]:
    """A pool's waiting messages per priority class (see the module docstring)."""
    counts = dict.fromkeys(PRIORITY_CLASSES, 0)
    if len(set(starts.values())) == 1:  # fifo: one level for every class
        counts["normal"] = sum(levels.values())
        return counts
    ordered = sorted(starts.items(), key=lambda item: item[1])
    for level, waiting in levels.items():
        below = [c for c, start in ordered if start <= int(level)]
        counts[below[-1] if below else ordered[0][0]] += waiting
    return counts


def read_status(client: redis.Redis, config: CoreModuleConfig) -> dict[str, Any]:
    """The status document (the route's answer; synchronous Redis reads with `client`)."""
    snap = read_snapshot(client, config)
    issues, advice = health_of(snap, config, sample_window(client, snap, config))
    stranded = stranded_lists(client, config, snap.workers)
    more_issues, more_advice = stranded_health(stranded)
    rejected = list_rejections(client, RECENT_REJECTED)
    dit_rate, _, _ = hit_rate(client, config.diffusion.queue)
    return {
        "object": "status",
        "time": time.time(),
        "healthy": not (issues or more_issues),
        "issues": issues + more_issues,
        "recommendations": advice + more_advice,
        "pools": _pools(snap, config),
        "models": {
            model: {"workers": hosts, "waiting": sum(snap.models.get(model, {}).values())}
            for model, hosts in sorted(model_servers(snap).items())
        },
        "workers": [_worker(w) for w in snap.workers],
        "dit_cache": {"hit_rate": dit_rate, "bytes": snap.dit_cache_bytes},
        "lora": adapter_stats(client, config.diffusion.queue),
        "rejected": {"count": sum(p.rejected for p in snap.pools.values()), "recent": rejected},
        "stranded": stranded,
        "links": {"flower": config.api.flower_url, "grafana": config.api.grafana_url},
    }


def _pools(snap: ClusterSnapshot, config: CoreModuleConfig) -> dict[str, Any]:
    starts = class_levels(config)
    found = {}
    for name, pool in config.pools_by_name().items():
        levels = snap.queues.get(pool.queue, {})
        stats = vars(snap.pools.get(pool.queue)) if pool.queue in snap.pools else {}
        found[name] = {
            "queue": pool.queue,
            "waiting": sum(levels.values()),
            "levels": {str(level): n for level, n in sorted(levels.items())},
            "classes": by_class(levels, starts),
            "workers": len(snap.workers_of(pool.queue)),
            **{k: stats.get(k, 0) for k in ("processed", "failed", "expired", "cancelled")},
            "rejected": stats.get("rejected", 0),
        }
    return found


def _worker(info: dict[str, Any]) -> dict[str, Any]:
    """A live worker as the page shows it: what it serves, runs and uses (`held`: the
    requests its engine runs now, where its heartbeat carries `resource_status`)."""
    memory = worker_resources(info)
    return {
        "hostname": info.get("hostname"),
        "queues": info.get("queues") or [],
        "stages": info.get("stages") or [],
        "models": info.get("models") or {},
        "pool_type": info.get("pool_type"),
        "concurrency": int(info.get("concurrency") or 0),
        "held": int((memory or {}).get("running") or 0),
        "dit_cache_bytes": int(info.get("dit_cache_bytes") or 0),
        "memory": memory,
        "beat_age_s": round(max(0.0, time.time() - float(info.get("beat") or 0)), 3),
    }


class StatusCache:
    """The last status this process read, kept `STATUS_TTL_S`: pages that poll share it
    (one per API process, on `app.state.status`)."""

    def __init__(self, client: redis.Redis, config: CoreModuleConfig) -> None:
        self.client, self.config = client, config
        self._at = 0.0
        self._value: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def read(self) -> dict[str, Any]:
        async with self._lock:
            if self._value is None or time.monotonic() - self._at >= STATUS_TTL_S:
                self._value = await asyncio.to_thread(read_status, self.client, self.config)
                self._at = time.monotonic()
            return self._value


@router.get("/v1/status")
async def status(request: Request) -> JSONResponse:
    return JSONResponse(await request.app.state.status.read())
