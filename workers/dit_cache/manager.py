"""The worker-local DiT cache: tensors kept on one device under an exact byte budget.

A diffusion worker reuses prompt embeddings, latents or block activations across
requests and steps. `DiTCacheManager` keeps them in this process, on `device`, evicting
by the configured `CacheStrategy` so that the stored bytes never exceed
`config.max_memory_gib * GIB` (GiB: 2**30 bytes), and optionally compressing them
(`workers.dit_cache.compression`).

Decisions:

* Accounting: `stats()["bytes"]` is exactly the sum of `numel * element_size` of the
  stored (post-compression) tensors, after every insert, replacement, invalidation,
  expiry and eviction. Room is made before an entry is added, so the budget holds at
  every instant, not only between calls.
* Refusal: an entry that is larger than the whole budget (after compression) is refused
  before anything is evicted for it: `put` returns False (logged, counted in
  `refused`), `set_cache` raises `CacheError`. An older entry under the same key is
  dropped (reason "invalidated"), since the caller meant to supersede it.
* Copies: `put` stores private copies (so later in-place changes by the caller do not
  reach the cache) and `get` returns fresh copies (decompressed when compression is on),
  on the manager's device. The caller may modify what it gets; the cache cannot be
  corrupted through its API. A copy per hit is cheap next to a DiT step.
* Threads: one lock guards the entries, the policy and the counters; compression,
  device copies and the copies `get` hands out are made outside it. Stored tensors are
  never modified after insertion, so reading them unlocked is safe.
* Listener: every insert and every removal is reported to the `CacheListener`, outside
  the lock, in exactly the order the cache changed (events are queued under the lock
  and delivered by whichever thread drains the queue), so a directory (e.g. in Redis)
  can mirror the keys exactly. Listener exceptions are logged and swallowed.
* `ttl_seconds` applies under `CacheStrategy.TTL` only. Expired entries are dropped on
  every access and insert.
* Keys are plain strings; namespaces by prefix are the caller's business.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from omni_tasks.config import GIB, CacheConfig
from omni_tasks.coordination.outage import Outage
from omni_tasks.errors import CacheError
from workers.dit_cache.compression import compress, decompress
from workers.dit_cache.eviction import EvictionPolicy, create_policy
from workers.dit_cache.sizing import move_to, value_nbytes

log = logging.getLogger(__name__)

EvictReason = Literal["evicted", "expired", "invalidated", "replaced", "cleared"]


class CacheListener(Protocol):
    """Told about every change of the cache's key set (e.g. to mirror it in Redis)."""

    def on_insert(self, key: str, nbytes: int) -> None:
        """`key` is now cached, weighing `nbytes` stored bytes."""

    def on_evict(self, key: str, reason: str) -> None:
        """`key` left: "evicted", "expired", "invalidated", "replaced" or "cleared"."""


@dataclass(frozen=True)
class _Entry:
    stored: Any
    nbytes: int


class DiTCacheManager:
    """Byte-bounded, thread-safe tensor cache of one worker process (see module docstring).

    The core module's API (`get_cache`, `set_cache`, `invalidate_cache`, `get_hit_rate`,
    `get_memory_usage`, attributes `config`, `cache_stats`, `memory_usage`) plus
    synchronous twins for worker threads, which have no event loop.
    """

    def __init__(
        self,
        config: CacheConfig,
        device: str | torch.device = "cpu",
        listener: CacheListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        config.validate()
        self.config = config
        self.device = _resolve_device(device)
        self.max_bytes = int(config.max_memory_gib * GIB)
        self.cache_stats = {"hits": 0, "misses": 0}
        self._counters = {"evictions": 0, "expired": 0, "refused": 0}
        self._listener = listener
        #: The listener mirrors into Redis: while it is away, one line per backoff step.
        self._listener_outage = Outage("DiT cache directory", log)
        self._clock = clock
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._bytes = 0
        self._policy: EvictionPolicy = create_policy(config.strategy, config)
        self._events: deque[tuple[str, str, Any]] = deque()
        self._notify_lock = threading.RLock()

    # ---- the async API -----------------------------------------------------------------

    async def get_cache(self, cache_key: str) -> Any | None:
        """The cached value (a fresh copy) or None; runs inline, like `get`."""
        return self.get(cache_key)

    async def set_cache(self, cache_key: str, data: Any) -> None:
        """Store `data`; raises `CacheError` when it is refused (larger than the budget)."""
        if not self.put(cache_key, data):
            raise CacheError(
                f"DiT cache entry {cache_key!r} is larger than the whole cache budget "
                f"({self.max_bytes} bytes)"
            )

    async def invalidate_cache(self, cache_key: str) -> None:
        """Drop `cache_key` if cached."""
        self.invalidate(cache_key)

    def get_hit_rate(self) -> float:
        """Hits / (hits + misses) of `get`/`get_cache`, 0.0 before any lookup."""
        with self._lock:
            lookups = self.cache_stats["hits"] + self.cache_stats["misses"]
            return self.cache_stats["hits"] / lookups if lookups else 0.0

    def get_memory_usage(self) -> float:
        """Stored bytes in GiB (2**30 bytes)."""
        return self.memory_usage

    @property
    def memory_usage(self) -> float:
        """Stored bytes in GiB (2**30 bytes)."""
        return self._bytes / GIB

    # ---- synchronous API --------------------------------------------------------------

    def get(self, key: str) -> Any | None:
        """A fresh copy of the value cached under `key` (on `device`), or None."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            entry = self._entries.get(key)
            if entry is None:
                self.cache_stats["misses"] += 1
            else:
                self.cache_stats["hits"] += 1
                self._policy.on_access(key, now)
        self._drain()
        return None if entry is None else decompress(entry.stored)

    def put(self, key: str, value: Any, *, lossless: bool = False) -> bool:
        """Cache a copy of `value` under `key`, evicting as needed; False when refused.

        `lossless=True` stores this entry uncompressed even when compression is on
        (for values whose reuse must be exact, e.g. the latents of an exact repeat).

        Raises `CacheError` when `value` holds something other than tensors, nested
        dicts/lists/tuples of them and small Python scalars.
        """
        if not isinstance(key, str):
            raise TypeError(f"cache keys are str, not {type(key).__name__}")
        try:
            stored, nbytes = self._prepare(value, compress_ok=not lossless)
        except TypeError as exc:
            raise CacheError(str(exc)) from exc
        if stored is None:
            self._refuse(key, nbytes)
            return False
        with self._lock:
            now = self._clock()
            self._expire(now)
            if key in self._entries:
                self._remove(key, "replaced")
            while self._bytes + nbytes > self.max_bytes:
                self._evict_one(key)
            self._entries[key] = _Entry(stored, nbytes)
            self._bytes += nbytes
            self._policy.on_insert(key, nbytes, now)
            self._event("insert", key, nbytes)
        self._drain()
        return True

    def invalidate(self, key: str) -> bool:
        """Drop `key`; True when it was cached."""
        with self._lock:
            self._expire(self._clock())
            found = key in self._entries
            if found:
                self._remove(key, "invalidated")
        self._drain()
        return found

    def contains(self, key: str) -> bool:
        """Whether `key` is cached (not counted as a hit or miss, no recency change)."""
        with self._lock:
            self._expire(self._clock())
            found = key in self._entries
        self._drain()
        return found

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.contains(key)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """The cached keys, in no particular order."""
        with self._lock:
            self._expire(self._clock())
            keys = list(self._entries)
        self._drain()
        return keys

    def stats(self) -> dict[str, Any]:
        """Counters and sizes, one consistent snapshot."""
        with self._lock:
            hits, misses = self.cache_stats["hits"], self.cache_stats["misses"]
            return {
                "hits": hits,
                "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
                **self._counters,
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "strategy": self.config.strategy.value,
                "device": str(self.device),
            }

    def clear(self) -> None:
        """Drop every entry (reason "cleared") and the policy's history; counters stay."""
        with self._lock:
            for key in list(self._entries):
                self._remove(key, "cleared")
            self._policy = create_policy(self.config.strategy, self.config)
        self._drain()

    # ---- internals (callers hold self._lock unless said otherwise) ---------------------

    def _prepare(self, value: Any, compress_ok: bool = True) -> tuple[Any | None, int]:
        """(stored form on `device`, its bytes); stored is None when over budget. Unlocked."""
        if not (self.config.enable_compression and compress_ok):
            nbytes = value_nbytes(value)  # a compact copy weighs exactly this
            if nbytes > self.max_bytes:
                return None, nbytes
            stored = move_to(value, self.device, copy=True)
        else:
            value_nbytes(value)  # reject unsupported leaves before any work
            stored, _ = compress(value, self.config.compression_ratio)
            stored = move_to(stored, self.device)
        nbytes = value_nbytes(stored)
        return (stored if nbytes <= self.max_bytes else None), nbytes

    def _refuse(self, key: str, nbytes: int) -> None:
        with self._lock:
            self._counters["refused"] += 1
            if key in self._entries:
                self._remove(key, "invalidated")
        self._drain()
        log.warning(
            "DiT cache refused %r: %d bytes exceed the whole budget of %d bytes",
            key,
            nbytes,
            self.max_bytes,
        )

    def _remove(self, key: str, reason: EvictReason) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
        if reason == "evicted":
            self._policy.on_evict(key)
        else:
            self._policy.on_remove(key)
        self._event("evict", key, reason)

    def _evict_one(self, incoming: str) -> None:
        victim = self._policy.victim(incoming)
        if victim is None or victim not in self._entries:
            raise RuntimeError(f"eviction policy gave victim {victim!r} for a non-empty cache")
        self._remove(victim, "evicted")
        self._counters["evictions"] += 1

    def _expire(self, now: float) -> None:
        for key in self._policy.expired(now):
            self._remove(key, "expired")
            self._counters["expired"] += 1

    def _event(self, kind: str, key: str, arg: Any) -> None:
        if self._listener is not None:
            self._events.append((kind, key, arg))

    def _drain(self) -> None:
        """Deliver queued events in order, outside the cache lock. Called unlocked."""
        if self._listener is None:
            return
        with self._notify_lock:
            while self._events:
                try:
                    kind, key, arg = self._events.popleft()
                except IndexError:
                    return
                self._listener_outage.run(self._notify, kind, key, arg)

    def _notify(self, kind: str, key: str, arg: Any) -> None:
        assert self._listener is not None
        if kind == "insert":
            self._listener.on_insert(key, arg)
        else:
            self._listener.on_evict(key, arg)

    def _audit(self) -> int:
        """Recount the stored bytes and check the bookkeeping; for tests. Returns bytes."""
        with self._lock:
            counted = sum(value_nbytes(e.stored) for e in self._entries.values())
            assert counted == self._bytes, (counted, self._bytes)
            assert sum(e.nbytes for e in self._entries.values()) == self._bytes
            assert self._bytes <= self.max_bytes, (self._bytes, self.max_bytes)
            resident = self._policy.resident()
            assert len(resident) == len(set(resident)) == len(self._entries)
            assert set(resident) == set(self._entries)
            return counted


def _resolve_device(device: str | torch.device) -> torch.device:
    """Pin "cuda" to the current index, so every thread copies to the same GPU."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device
