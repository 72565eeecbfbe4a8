"""The DiT cache directory in Redis: which live worker holds which cache key.

Workers keep the cached tensors in their own device memory; Redis keeps only metadata,
updated on every insert and eviction (so the directory is exact, not guessed from
routing history), and cleared when a worker stops or its heartbeat expires. The
producer reads it to route a repeat request to the worker that holds its keys.

Layout (names in `keys`): `cache:holders:<key>` hash, field = worker hostname, value =
JSON {pool, bytes, created, last_hit, hits}; `cache:worker:<hostname>` set of the
keys a worker holds; `cache:stats:<pool>` / `cache:wstats:<hostname>` hit/miss counters.
Multi-key updates are Lua scripts (atomic, one round trip).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from omni_tasks import keys
from omni_tasks.lua import script
from omni_tasks.redis_client import get_redis

# KEYS[1] holders hash of the cache key, KEYS[2] the worker's key set.
# ARGV: worker, cache key, pool, bytes, now.
INSERT = """
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({pool=ARGV[3], bytes=tonumber(ARGV[4]),
  created=tonumber(ARGV[5]), last_hit=0, hits=0}))
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""

# KEYS[1] holders hash, KEYS[2] the worker's key set. ARGV: worker, cache key.
REMOVE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""

# KEYS[1] holders hash. ARGV: worker, now. Counts a hit on an entry the worker holds.
HIT = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local entry = cjson.decode(raw)
entry.hits = entry.hits + 1
entry.last_hit = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
return entry.hits
"""

# KEYS[1] the worker's key set. ARGV: worker, holders-key prefix.
# Forgets everything the worker held (it stopped, or its heartbeat expired).
CLEAR_WORKER = """
local held = redis.call('SMEMBERS', KEYS[1])
for _, k in ipairs(held) do
  redis.call('HDEL', ARGV[2] .. k, ARGV[1])
end
redis.call('DEL', KEYS[1])
return #held
"""

# KEYS: the holders hashes of a request's cache keys, best first.
# ARGV: heartbeat-key prefix, worker-queue prefix, priority separator.
# Returns the first holder that is alive and whose own queue holds fewer messages
# than its concurrency (see `pick_holder`), or false. Reads the heartbeat and queue
# keys it derives from the holder names (fine on a single Redis, not on a cluster).
PICK = """
for _, holders in ipairs(KEYS) do
  local names = redis.call('HKEYS', holders)
  for _, worker in ipairs(names) do
    local beat = ARGV[1] .. worker
    if redis.call('EXISTS', beat) == 1 then
      local slots = tonumber(redis.call('HGET', beat, 'concurrency') or '1') or 1
      local q = ARGV[2] .. worker
      local backlog = redis.call('LLEN', q)
      for p = 1, 9 do backlog = backlog + redis.call('LLEN', q .. ARGV[3] .. p) end
      if backlog < slots then return worker end
    end
  end
end
return false
"""


# KEYS[1] source list, KEYS[2] destination list. Moves every message, oldest first, so
# the destination serves them in their original order after its own older messages.
MOVE_ALL = """
local n = 0
while redis.call('RPOPLPUSH', KEYS[1], KEYS[2]) do n = n + 1 end
return n
"""


@dataclass
class Holder:
    worker: str
    pool: str
    bytes: int
    created: float
    last_hit: float
    hits: int


def record_insert(worker: str, pool: str, cache_key: str, nbytes: int) -> None:
    script(get_redis(), INSERT)(
        keys=[keys.cache_holders(cache_key), keys.cache_worker(worker)],
        args=[worker, cache_key, pool, int(nbytes), time.time()],
    )


def record_remove(worker: str, cache_key: str) -> None:
    script(get_redis(), REMOVE)(
        keys=[keys.cache_holders(cache_key), keys.cache_worker(worker)], args=[worker, cache_key]
    )


def record_hit(worker: str, cache_key: str) -> None:
    script(get_redis(), HIT)(keys=[keys.cache_holders(cache_key)], args=[worker, time.time()])


def clear_worker(worker: str) -> int:
    return int(
        script(get_redis(), CLEAR_WORKER)(
            keys=[keys.cache_worker(worker)], args=[worker, keys.cache_holders("")]
        )
    )


def holders(cache_key: str) -> list[Holder]:
    raw = get_redis().hgetall(keys.cache_holders(cache_key))
    return [Holder(worker=w, **json.loads(v)) for w, v in sorted(raw.items())]


def held_by(worker: str) -> set[str]:
    return set(get_redis().smembers(keys.cache_worker(worker)))


def pick_holder(cache_keys: list[str]) -> str | None:
    """The live, not overloaded worker holding the first of `cache_keys` it can find.

    Overloaded = its own queue already holds as many requests as it has slots: the
    next one would wait at least one full run there, and a full run is the most a
    cache hit can save (a miss elsewhere costs one run), so past that point spreading
    the work wins.
    """
    found = script(get_redis(), PICK)(
        keys=[keys.cache_holders(k) for k in cache_keys],
        args=[keys.worker(""), keys.worker_queue(""), keys.PRIORITY_SEP],
    )
    return found or None


def sweep_dead_workers(pool_queue: str) -> list[str]:
    """Clear the entries of workers whose heartbeat expired, and move the messages left
    in their own queues (affinity-routed, or restored there after they died) back to
    the pool queue at the same priority. Run periodically by every live DiT worker."""
    client = get_redis()
    dead: set[str] = set()
    prefix = keys.cache_worker("")
    for key in client.scan_iter(match=prefix + "*", count=500):
        worker = key[len(prefix) :]
        if not client.exists(keys.worker(worker)):
            clear_worker(worker)
            dead.add(worker)
    qprefix = keys.worker_queue("")
    for key in client.scan_iter(match=qprefix + "*", count=500):
        worker, sep, level = key[len(qprefix) :].rpartition(keys.PRIORITY_SEP)
        if not sep or not level.isdigit():
            worker, level = key[len(qprefix) :], "0"
        if client.exists(keys.worker(worker)):
            continue
        target = keys.queue_key(pool_queue, int(level))
        if script(client, MOVE_ALL)(keys=[key, target]):
            dead.add(worker)
    return sorted(dead)


def count_lookup(pool: str, worker: str, kind: str, hit: bool) -> None:
    """Hit/miss counters per pool and per worker, per kind of entry."""
    field = f"{'hits' if hit else 'misses'}:{kind}"
    pipe = get_redis().pipeline(transaction=False)
    pipe.hincrby(keys.cache_stats(pool), field, 1)
    pipe.hincrby(keys.cache_worker_stats(worker), field, 1)
    pipe.execute()


def hit_rate(pool: str, kind: str | None = None) -> tuple[float, int, int]:
    """(rate, hits, misses) of a pool, over one kind of entry or all of them."""
    raw: dict[str, Any] = get_redis().hgetall(keys.cache_stats(pool))
    hits = sum(int(v) for f, v in raw.items() if f.startswith("hits:") and _kind(f, kind))
    misses = sum(int(v) for f, v in raw.items() if f.startswith("misses:") and _kind(f, kind))
    total = hits + misses
    return (hits / total if total else 0.0), hits, misses


def _kind(field: str, kind: str | None) -> bool:
    return kind is None or field.endswith(":" + kind)
