"""The index of workers by their last beat: who is alive, who died, and which lists are
the diffusion workers' own queues, read in O(workers of a kind) without a keyspace scan.

Each beat adds one `ZADD` to the sorted set of each of its kinds (`KeySpace.worker_beats`),
the stages it runs:

- `ar`: workers that run the AR stage: the HTTP API counts them before it accepts a
  text request, and reads their heartbeats for the models they serve.
- `dit`: workers that run the diffusion stage. They own queues (cache-affinity routing
  puts repeats there) and DiT cache entries that must be moved back and cleared when
  they die, so they stay in the index after death until a live one sweeps them
  (`cache_directory.sweep_dead_workers`).
- `tts`: workers that run the speech stage: the HTTP API counts them before it
  accepts a speech request.
- `other`: workers that run none of these (the `probe` queue's); its entry only says when it
  last beat.

A worker is live while its last beat is younger than `HEARTBEAT_TTL_S`; its heartbeat
hash, whose expiry is renewed every other beat, expires 15 to 20 s after its last beat,
so a hash that exists always belongs to a worker the index calls live. A clean exit
removes its entry; entries older than `FORGET_AFTER_S` are pruned by the reaper.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from omni_tasks.coordination import keys
from omni_tasks.coordination.client import OmniRedis
from omni_tasks.coordination.keyspace import KeySpace

#: How often a worker beats.
HEARTBEAT_INTERVAL_S = 5.0
#: How long a beat counts (four beats); also the heartbeat hash's time to live.
HEARTBEAT_TTL_S = 20
#: Index entries of workers dead for this long are dropped (their own queues were
#: moved back long before, by any live diffusion worker's sweep).
FORGET_AFTER_S = 3600.0
AR, DIT, TTS, OTHER = "ar", "dit", "tts", "other"
KINDS = (AR, DIT, TTS, OTHER)


def kinds_of(stages: Iterable[str]) -> list[str]:
    """The indexes a worker running `stages` beats into."""
    return [kind for kind in (AR, DIT, TTS) if kind in stages] or [OTHER]


def beat(pipe: Any, space: KeySpace, kinds: list[str], hostname: str, now: float) -> None:
    """Queue the index's part of one beat on `pipe` (one command per kind)."""
    for kind in kinds:
        pipe.zadd(space.worker_beats(kind), {hostname: now})


def leave(client: OmniRedis, kinds: list[str], hostname: str) -> None:
    """A clean exit: the worker is no longer listed."""
    for kind in kinds:
        client.zrem(client.keyspace.worker_beats(kind), hostname)


def live_window(now: float | None = None) -> tuple[str, str]:
    """The (min, max) scores of a live worker's last beat, for ZRANGEBYSCORE/ZCOUNT."""
    return f"({(time.time() if now is None else now) - HEARTBEAT_TTL_S}", "+inf"


def live(client: OmniRedis, kinds: Iterable[str] = KINDS, now: float | None = None) -> list[str]:
    """Hostnames whose last beat is younger than `HEARTBEAT_TTL_S`, each once."""
    pipe = client.pipeline(transaction=False)
    for kind in kinds:
        pipe.zrangebyscore(client.keyspace.worker_beats(kind), *live_window(now))
    return list(dict.fromkeys(host for found in pipe.execute() for host in found))


#: The whole index as read at once: kind -> hostname -> its last beat.
Index = dict[str, dict[str, float]]


def read(client: OmniRedis) -> Index:
    """Every kind's entries, live or not yet swept, in one round trip."""
    pipe = client.pipeline(transaction=False)
    for kind in KINDS:
        pipe.zrange(client.keyspace.worker_beats(kind), 0, -1, withscores=True)
    return {kind: dict(found) for kind, found in zip(KINDS, pipe.execute(), strict=True)}


def live_in(index: Index, kinds: Iterable[str] = KINDS, now: float | None = None) -> list[str]:
    """`live` over an index read with `read`: hostnames whose last beat is younger than
    `HEARTBEAT_TTL_S`, each once."""
    cutoff = (time.time() if now is None else now) - HEARTBEAT_TTL_S
    return list(
        dict.fromkeys(
            host for kind in kinds for host, beat in index.get(kind, {}).items() if beat > cutoff
        )
    )


def dead(client: OmniRedis, kind: str, now: float | None = None) -> list[str]:
    """Hostnames of `kind` whose last beat is older than `HEARTBEAT_TTL_S`."""
    cutoff = (time.time() if now is None else now) - HEARTBEAT_TTL_S
    return list(client.zrangebyscore(client.keyspace.worker_beats(kind), "-inf", cutoff))


def listed(client: OmniRedis, kind: str) -> list[str]:
    """Every hostname of `kind` in the index, live or not yet swept."""
    return list(client.zrange(client.keyspace.worker_beats(kind), 0, -1))


def forget(client: OmniRedis, kind: str, hostnames: list[str]) -> None:
    """Drop swept workers from the index."""
    if hostnames:
        client.zrem(client.keyspace.worker_beats(kind), *hostnames)


def prune(client: OmniRedis, now: float | None = None) -> None:
    """Drop the entries of workers dead for longer than `FORGET_AFTER_S` (one command
    per kind, run by the reaper's pass)."""
    cutoff = (time.time() if now is None else now) - FORGET_AFTER_S
    pipe = client.pipeline(transaction=False)
    for kind in KINDS:
        pipe.zremrangebyscore(client.keyspace.worker_beats(kind), "-inf", cutoff)
    pipe.execute()


def heartbeats(client: OmniRedis, hostnames: list[str]) -> list[dict[str, str]]:
    """The heartbeat hashes of `hostnames` that still exist, in one round trip."""
    if not hostnames:
        return []
    pipe = client.pipeline(transaction=False)
    for host in hostnames:
        pipe.hgetall(client.keyspace.worker(host))
    return [info for info in pipe.execute() if info]


def own_queue_keys(client: OmniRedis, index: Index | None = None) -> list[tuple[str, str, int]]:
    """(list key, worker, priority level) of every level of the own queue of each
    diffusion worker in the index (an empty list reads as length 0); from `index` when
    it was read already."""
    hosts = listed(client, DIT) if index is None else list(index.get(DIT, {}))
    return [
        (keys.queue_key(client.keyspace.worker_queue(host), level), host, level)
        for host in hosts
        for level in keys.PRIORITY_STEPS
    ]
