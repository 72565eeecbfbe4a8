"""Eviction policies of the DiT cache, one per `CacheStrategy`, behind one small interface.

The manager owns the entries and the byte count; a policy only orders keys. The manager
calls, always under its lock:

* `on_insert(key, nbytes, now)` when `key` becomes resident (a replaced key is removed
  first, so a replacement starts fresh in every policy: LFU count 1, new TTL, ARC T1);
* `on_access(key, now)` on a hit;
* `on_remove(key)` when `key` leaves for another reason than making room (invalidated,
  expired, replaced, cleared): the policy forgets it, ghosts included;
* `victim(incoming)` for the key to evict next to make room for `incoming` (a query),
  then `on_evict(victim)` to commit it;
* `expired(now)` for the keys whose time is up (only TTL has any).

Make room first, insert second: the entry being inserted is never its own victim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict

from omni_tasks.config import GIB, CacheConfig, CacheStrategy

DEFAULT_GHOST_LIMIT = 65536


class EvictionPolicy(ABC):
    """Orders resident keys for eviction; see the module docstring for the call protocol."""

    @abstractmethod
    def on_insert(self, key: str, nbytes: int, now: float) -> None: ...

    @abstractmethod
    def on_access(self, key: str, now: float) -> None: ...

    @abstractmethod
    def on_remove(self, key: str) -> None: ...

    @abstractmethod
    def victim(self, incoming: str | None = None) -> str | None:
        """The resident key to evict next (None when nothing is resident)."""

    def on_evict(self, key: str) -> None:
        """`key` is evicted to make room; by default the same as `on_remove`."""
        self.on_remove(key)

    def expired(self, now: float) -> list[str]:
        """Resident keys whose time is up at `now`, to be removed by the caller."""
        return []

    @abstractmethod
    def resident(self) -> list[str]:
        """The keys the policy tracks as resident (for audits), victim order first."""


class LRUPolicy(EvictionPolicy):
    """Least recently used (inserted or hit) goes first."""

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def on_insert(self, key: str, nbytes: int, now: float) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: str, now: float) -> None:
        self._order.move_to_end(key)

    def on_remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victim(self, incoming: str | None = None) -> str | None:
        return next(iter(self._order), None)

    def resident(self) -> list[str]:
        return list(self._order)


class LFUPolicy(EvictionPolicy):
    """Least frequently used goes first; among equals, the least recently used.

    Keys sit in per-count buckets, each ordered by when the key reached that count, which
    is its last use: so the first key of the lowest bucket is the LFU-then-LRU victim.
    Counts are not aged, and are lost when a key leaves.
    """

    def __init__(self) -> None:
        self._count: dict[str, int] = {}
        self._buckets: dict[int, OrderedDict[str, None]] = {}

    def _bucket_add(self, key: str, count: int) -> None:
        self._count[key] = count
        self._buckets.setdefault(count, OrderedDict())[key] = None

    def _bucket_drop(self, key: str) -> int:
        count = self._count.pop(key)
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]
        return count

    def on_insert(self, key: str, nbytes: int, now: float) -> None:
        if key in self._count:
            self._bucket_drop(key)
        self._bucket_add(key, 1)

    def on_access(self, key: str, now: float) -> None:
        self._bucket_add(key, self._bucket_drop(key) + 1)

    def on_remove(self, key: str) -> None:
        if key in self._count:
            self._bucket_drop(key)

    def victim(self, incoming: str | None = None) -> str | None:
        if not self._buckets:
            return None
        return next(iter(self._buckets[min(self._buckets)]))

    def count(self, key: str) -> int:
        return self._count.get(key, 0)

    def resident(self) -> list[str]:
        return [k for c in sorted(self._buckets) for k in self._buckets[c]]


class TTLPolicy(EvictionPolicy):
    """Entries live `ttl_seconds` from their insertion; hits do not extend them.

    When room is needed before anything has expired, the entry closest to expiry goes
    first, which with one TTL for all is the oldest insertion. Needs a non-decreasing
    clock (the manager's default is `time.monotonic`).
    """

    def __init__(self, ttl_seconds: float) -> None:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self.ttl = float(ttl_seconds)
        self._expires: OrderedDict[str, float] = OrderedDict()

    def on_insert(self, key: str, nbytes: int, now: float) -> None:
        self._expires.pop(key, None)
        self._expires[key] = now + self.ttl

    def on_access(self, key: str, now: float) -> None:
        pass

    def on_remove(self, key: str) -> None:
        self._expires.pop(key, None)

    def victim(self, incoming: str | None = None) -> str | None:
        return next(iter(self._expires), None)

    def expired(self, now: float) -> list[str]:
        out = []
        for key, deadline in self._expires.items():
            if deadline > now:
                break
            out.append(key)
        return out

    def expires_at(self, key: str) -> float | None:
        return self._expires.get(key)

    def resident(self) -> list[str]:
        return list(self._expires)


class ARCPolicy(EvictionPolicy):
    """Adaptive Replacement Cache (Megiddo & Modha, FAST 2003), counted in bytes.

    T1 holds keys seen once recently, T2 keys seen at least twice; B1/B2 remember
    (key, size) of keys evicted from T1/T2 ("ghosts", no data). A miss that hits a ghost
    tells which list was too small: a B1 hit grows the T1 target `p`, a B2 hit shrinks it,
    and a ghost-hit key is inserted straight into T2.

    Adaptation to byte-sized entries (c = the byte budget):

    * |T1|, |T2|, |B1|, |B2| and p are bytes, 0 <= p <= c.
    * A B1 ghost hit of size s: p += s * max(1, |B2| / |B1|); a B2 hit: p -= s * max(1,
      |B1| / |B2|) (the paper's deltas, scaled by the entry's size, 1 byte minimum).
    * REPLACE: evict T1's LRU when T1 is non-empty and (|T1| > p, or the incoming key is
      a B2 ghost and |T1| >= p, or T2 is empty); else T2's LRU. It runs as many times as
      the manager needs bytes, before the incoming key is inserted.
    * Ghosts are trimmed after each insert and eviction to the paper's bounds, in bytes:
      |T1| + |B1| <= c and |T1| + |T2| + |B1| + |B2| <= 2c (oldest ghosts first), and
      to `ghost_limit` keys in all so that zero-byte entries cannot grow them forever.
    * p adapts once per insert, at the first `victim(incoming)` or at `on_insert`,
      whichever comes first, so REPLACE sees the adapted p as in the paper.
    """

    def __init__(self, max_bytes: int, ghost_limit: int = DEFAULT_GHOST_LIMIT) -> None:
        self.c = max_bytes
        self.p = 0.0
        self.ghost_limit = ghost_limit
        self.t1: OrderedDict[str, int] = OrderedDict()
        self.t2: OrderedDict[str, int] = OrderedDict()
        self.b1: OrderedDict[str, int] = OrderedDict()
        self.b2: OrderedDict[str, int] = OrderedDict()
        self._bytes = {"t1": 0, "t2": 0, "b1": 0, "b2": 0}
        self._adapted: str | None = None

    def _lists(self) -> dict[str, OrderedDict[str, int]]:
        return {"t1": self.t1, "t2": self.t2, "b1": self.b1, "b2": self.b2}

    def _put(self, name: str, key: str, nbytes: int) -> None:
        self._lists()[name][key] = nbytes
        self._bytes[name] += nbytes

    def _pop(self, name: str, key: str) -> int:
        nbytes = self._lists()[name].pop(key)
        self._bytes[name] -= nbytes
        return nbytes

    def _where(self, key: str) -> str | None:
        for name, lst in self._lists().items():
            if key in lst:
                return name
        return None

    def sizes(self) -> dict[str, int]:
        """Bytes in T1, T2, B1, B2."""
        return dict(self._bytes)

    def _adapt(self, key: str) -> None:
        if self._adapted == key:
            return
        self._adapted = key
        b1, b2 = self._bytes["b1"], self._bytes["b2"]
        if key in self.b1:
            size = max(self.b1[key], 1)
            self.p = min(self.p + size * max(1.0, b2 / b1 if b1 else 1.0), float(self.c))
        elif key in self.b2:
            size = max(self.b2[key], 1)
            self.p = max(self.p - size * max(1.0, b1 / b2 if b2 else 1.0), 0.0)

    def on_insert(self, key: str, nbytes: int, now: float) -> None:
        self._adapt(key)
        self._adapted = None
        where = self._where(key)
        if where is not None:
            self._pop(where, key)
        self._put("t2" if where in ("b1", "b2") else "t1", key, nbytes)
        self._trim_ghosts()

    def on_access(self, key: str, now: float) -> None:
        if key in self.t1:
            self._put("t2", key, self._pop("t1", key))
        elif key in self.t2:
            self.t2.move_to_end(key)

    def on_remove(self, key: str) -> None:
        where = self._where(key)
        if where is not None:
            self._pop(where, key)

    def victim(self, incoming: str | None = None) -> str | None:
        if incoming is not None:
            self._adapt(incoming)
        t1 = self._bytes["t1"]
        if self.t1 and (
            t1 > self.p or (incoming is not None and incoming in self.b2 and t1 >= self.p)
        ):
            return next(iter(self.t1))
        if self.t2:
            return next(iter(self.t2))
        return next(iter(self.t1), None)

    def on_evict(self, key: str) -> None:
        if key in self.t1:
            self._put("b1", key, self._pop("t1", key))
        elif key in self.t2:
            self._put("b2", key, self._pop("t2", key))
        self._trim_ghosts()

    def _trim_ghosts(self) -> None:
        b = self._bytes
        while self.b1 and b["t1"] + b["b1"] > self.c:
            self._pop("b1", next(iter(self.b1)))
        while self.b2 and sum(b.values()) > 2 * self.c:
            self._pop("b2", next(iter(self.b2)))
        while len(self.b1) + len(self.b2) > self.ghost_limit:
            name = "b1" if len(self.b1) >= len(self.b2) else "b2"
            self._pop(name, next(iter(self._lists()[name])))

    def resident(self) -> list[str]:
        return list(self.t1) + list(self.t2)


def create_policy(strategy: CacheStrategy, config: CacheConfig) -> EvictionPolicy:
    """The policy for `strategy`; TTL uses `config.ttl_seconds`, ARC the byte budget."""
    if strategy is CacheStrategy.LRU:
        return LRUPolicy()
    if strategy is CacheStrategy.LFU:
        return LFUPolicy()
    if strategy is CacheStrategy.TTL:
        return TTLPolicy(config.ttl_seconds)
    if strategy is CacheStrategy.ADAPTIVE:
        return ARCPolicy(int(config.max_memory_gib * GIB))
    raise ValueError(f"unknown cache strategy {strategy!r}")
