"""One read of the cluster: queue depths, per-pool counters and the live workers with
what their heartbeats say (the models they serve, their device memory).

Every producer and worker writes to the same keys, so any process sees the whole
system; nothing here depends on which process scheduled what. Pools are named by
their queue. A snapshot reads the worker index once, for both its workers and the
diffusion workers' own queues that its depths count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination import worker_index
from omni_tasks.coordination.client import OmniRedis
from omni_tasks.coordination.depths import all_depths


@dataclass
class PoolStats:
    """A pool's cumulative counters (`KeySpace.stats`: one hash field each)."""

    processed: int = 0
    failed: int = 0
    expired: int = 0
    cancelled: int = 0
    rejected: int = 0
    duplicates: int = 0
    restored: int = 0
    recovered: int = 0
    run_s_sum: float = 0.0
    queued_s_sum: float = 0.0

    @classmethod
    def from_hash(cls, raw: dict[str, Any]) -> PoolStats:
        """The counters of a stats hash; a field it lacks is 0."""
        return cls(**{f.name: type(f.default)(raw.get(f.name, f.default)) for f in fields(cls)})


@dataclass
class ClusterSnapshot:
    queues: dict[str, dict[int, int]]
    pools: dict[str, PoolStats]
    workers: list[dict[str, Any]] = field(default_factory=list)
    #: Messages waiting per registered diffusion model (its queue), per level.
    models: dict[str, dict[int, int]] = field(default_factory=dict)

    @property
    def queued(self) -> int:
        return sum(sum(levels.values()) for levels in self.queues.values())

    @property
    def processed(self) -> int:
        return sum(p.processed for p in self.pools.values())

    @property
    def failed(self) -> int:
        return sum(p.failed for p in self.pools.values())

    @property
    def dit_cache_bytes(self) -> int:
        return sum(int(w.get("dit_cache_bytes", 0)) for w in self.workers)

    @property
    def dit_cache_max_bytes(self) -> int:
        return sum(int(w.get("dit_cache_max_bytes", 0)) for w in self.workers)

    def workers_of(self, queue: str) -> list[dict[str, Any]]:
        return [w for w in self.workers if queue in w.get("queues", [])]


def read_snapshot(client: OmniRedis, config: CoreModuleConfig) -> ClusterSnapshot:
    """The cluster now, read with `client`: counters, live workers (sorted by hostname)
    and depths."""
    queues = config.pool_queues()
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.hgetall(client.keyspace.stats(queue))
    pools = {
        queue: PoolStats.from_hash(raw) for queue, raw in zip(queues, pipe.execute(), strict=True)
    }
    index = worker_index.read(client)
    workers = [
        _decoded(info) for info in worker_index.heartbeats(client, worker_index.live_in(index))
    ]
    workers.sort(key=lambda w: w.get("hostname", ""))
    depths, models = all_depths(client, config, index)
    return ClusterSnapshot(queues=depths, pools=pools, workers=workers, models=models)


def _decoded(info: dict[str, Any]) -> dict[str, Any]:
    """A heartbeat hash with its JSON fields (`queues`, `stages`, `models`) read."""
    for name in ("queues", "stages"):
        info[name] = json.loads(info.get(name) or "[]")
    info["models"] = _json_object(info.get("models"))
    return info


def _json_object(raw: Any) -> dict[str, Any]:
    """A heartbeat's JSON object field (`models`: stage -> model), {} when unreadable."""
    try:
        found = json.loads(raw or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def model_servers(snapshot: ClusterSnapshot) -> dict[str, list[str]]:
    """Registered diffusion model -> the live workers serving it (their heartbeats'
    `models`), hostnames sorted; [] for a model none serves."""
    served: dict[str, list[str]] = {model: [] for model in snapshot.models}
    for worker in snapshot.workers:
        model = (worker.get("models") or {}).get("dit")
        if model is not None:
            served.setdefault(model, []).append(str(worker.get("hostname", "?")))
    return {model: sorted(hosts) for model, hosts in served.items()}


def unserved_models(snapshot: ClusterSnapshot) -> list[str]:
    """The registered diffusion models no live worker serves: their requests wait."""
    return [model for model, hosts in model_servers(snapshot).items() if not hosts]


def worker_resources(worker: dict[str, Any]) -> dict[str, Any] | None:
    """The `resource_status` a worker's heartbeat carries (device, total_bytes,
    budget_bytes, used_bytes, cache_bytes, running, batch), or None without one."""
    raw = worker.get("resource_status")
    if isinstance(raw, dict):
        return raw
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def memory_figures(snapshot: ClusterSnapshot) -> tuple[int, int]:
    """(used, budget) device bytes summed over the workers that report them."""
    found = [r for r in map(worker_resources, snapshot.workers) if r]
    return (
        sum(int(r.get("used_bytes", 0)) for r in found),
        sum(int(r.get("budget_bytes", 0)) for r in found),
    )
