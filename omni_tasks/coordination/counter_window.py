"""The recent window: what the cluster's counters did over the last few metrics
intervals, so a rate (throughput, failures, cache hits) says what is happening now.

Counters only grow, so only their increase says what is recent. Every process that
samples them adds its sample to one shared series (`record_sample`, the write); a
window compares the counters now with the oldest sample inside it (`read_window`, a
read only), whichever process wrote it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination.cache_directory import hit_rate
from omni_tasks.coordination.client import OmniRedis
from omni_tasks.coordination.rejections import MAX_RECORDS
from omni_tasks.coordination.snapshots import ClusterSnapshot, PoolStats

#: Rates are judged over this many metrics intervals (60 s with the default 10 s).
WINDOW_INTERVALS = 6
#: Counter samples kept, whatever the window: the series stays small however many
#: processes sample it.
MAX_SAMPLES = 1000
MAX_SAMPLE_AGE_S = 3600


@dataclass
class Counters:
    """The cluster's cumulative counters at one moment."""

    time: float
    pools: dict[str, PoolStats]
    cache_hits: int = 0
    cache_misses: int = 0


@dataclass
class Window:
    """What happened in the recent window: counter increases over `seconds` (0 when
    no earlier sample exists yet), and records pushed onto the rejected list."""

    seconds: float
    pools: dict[str, PoolStats]
    cache_hits: int = 0
    cache_misses: int = 0
    rejected: int = 0

    @property
    def processed(self) -> int:
        return sum(p.processed for p in self.pools.values())

    @property
    def throughput(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def window_seconds(config: CoreModuleConfig) -> float:
    return float(WINDOW_INTERVALS * config.metrics_interval)


def current_counters(
    client: OmniRedis, snapshot: ClusterSnapshot, config: CoreModuleConfig
) -> Counters:
    """The counters now: the snapshot's pools and the DiT cache's hits and misses."""
    _, hits, misses = hit_rate(client, config.diffusion.queue)
    return Counters(time.time(), snapshot.pools, hits, misses)


def record_sample(client: OmniRedis, counters: Counters) -> None:
    """Add `counters` to the shared series, trimmed by age and count."""
    member = json.dumps(
        {
            "t": counters.time,
            "pools": {q: asdict(p) for q, p in counters.pools.items()},
            "hits": counters.cache_hits,
            "misses": counters.cache_misses,
        }
    )
    pipe = client.pipeline(transaction=True)
    pipe.zadd(client.keyspace.metrics_samples(), {member: counters.time})
    pipe.zremrangebyscore(
        client.keyspace.metrics_samples(), "-inf", counters.time - MAX_SAMPLE_AGE_S
    )
    pipe.zremrangebyrank(client.keyspace.metrics_samples(), 0, -MAX_SAMPLES - 1)
    pipe.execute()


def read_window(client: OmniRedis, now: Counters, config: CoreModuleConfig) -> Window:
    """The window ending at `now`: its counters' increase since the oldest sample of
    the window (any process's; none yet: an empty window), and the messages rejected
    in it. Writes nothing."""
    since = now.time - window_seconds(config)
    oldest = client.zrangebyscore(client.keyspace.metrics_samples(), since, "+inf", start=0, num=1)
    base = json.loads(oldest[0]) if oldest else {"t": now.time, "pools": {}}
    pools = {q: _increase(p, base["pools"].get(q)) for q, p in now.pools.items()}
    records = client.lrange(client.keyspace.rejected(), 0, MAX_RECORDS - 1)
    rejected = sum(1 for r in records if float(json.loads(r).get("time", 0)) >= since)
    return Window(
        seconds=max(now.time - float(base["t"]), 0.0),
        pools=pools,
        cache_hits=max(now.cache_hits - int(base.get("hits", now.cache_hits)), 0),
        cache_misses=max(now.cache_misses - int(base.get("misses", now.cache_misses)), 0),
        rejected=rejected,
    )


def sample_window(client: OmniRedis, snapshot: ClusterSnapshot, config: CoreModuleConfig) -> Window:
    """Sample the counters now (`record_sample`), then read the window that ends
    there: what a status read does, so the series has a sample per read."""
    now = current_counters(client, snapshot, config)
    record_sample(client, now)
    return read_window(client, now, config)


def _increase(now: PoolStats, base: dict[str, Any] | None) -> PoolStats:
    """`now` minus `base`, field by field; a counter that went down (reset) counts 0."""
    if base is None:
        return PoolStats()
    return PoolStats(
        **{f.name: max(getattr(now, f.name) - base.get(f.name, 0), 0) for f in fields(now)}
    )
