"""Eviction order of each strategy, and ARC against LRU / LFU on the workloads it targets."""

from __future__ import annotations

import random

import pytest
import torch

from omni_tasks.config import CacheConfig, CacheStrategy
from workers.dit_cache import GIB, DiTCacheManager
from workers.dit_cache.eviction import (
    ARCPolicy,
    LFUPolicy,
    LRUPolicy,
    TTLPolicy,
    create_policy,
)

ENTRY = torch.zeros(256)  # 1 KiB, fp32
ENTRY_BYTES = 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.evicted: list[tuple[str, str]] = []

    def on_insert(self, key: str, nbytes: int) -> None:
        pass

    def on_evict(self, key: str, reason: str) -> None:
        self.evicted.append((key, reason))


def manager(strategy: CacheStrategy, entries: int, **kwargs) -> DiTCacheManager:
    config = CacheConfig(
        max_memory_gib=entries * ENTRY_BYTES / GIB,
        strategy=strategy,
        enable_compression=False,
        ttl_seconds=kwargs.pop("ttl_seconds", 3600),
    )
    return DiTCacheManager(config, **kwargs)


def test_create_policy_per_strategy() -> None:
    config = CacheConfig(max_memory_gib=1.0, ttl_seconds=7)
    assert isinstance(create_policy(CacheStrategy.LRU, config), LRUPolicy)
    assert isinstance(create_policy(CacheStrategy.LFU, config), LFUPolicy)
    ttl = create_policy(CacheStrategy.TTL, config)
    assert isinstance(ttl, TTLPolicy) and ttl.ttl == 7
    arc = create_policy(CacheStrategy.ADAPTIVE, config)
    assert isinstance(arc, ARCPolicy) and arc.c == GIB


def test_lru_evicts_least_recently_used() -> None:
    rec = Recorder()
    m = manager(CacheStrategy.LRU, 3, listener=rec)
    for key in "abc":
        m.put(key, ENTRY)
    assert m.get("a") is not None
    m.put("d", ENTRY)
    m.put("e", ENTRY)
    assert rec.evicted == [("b", "evicted"), ("c", "evicted")]
    assert sorted(m.keys()) == ["a", "d", "e"]


def test_lfu_evicts_least_frequent_then_least_recent() -> None:
    rec = Recorder()
    m = manager(CacheStrategy.LFU, 3, listener=rec)
    for key in "abc":
        m.put(key, ENTRY)
    for key in "aaacb":  # counts a=4, b=2, c=2; c was used before b
        m.get(key)
    m.put("d", ENTRY)
    assert rec.evicted == [("c", "evicted")]
    m.put("e", ENTRY)  # d (count 1) is the least frequent
    assert rec.evicted[-1] == ("d", "evicted")
    m.get("e")
    m.get("e")  # e=3 > b=2
    m.put("f", ENTRY)
    assert rec.evicted[-1] == ("b", "evicted")
    assert sorted(m.keys()) == ["a", "e", "f"]


def test_lfu_policy_counts() -> None:
    p = LFUPolicy()
    p.on_insert("x", 1, 0.0)
    p.on_insert("y", 1, 0.0)
    p.on_access("x", 0.0)
    assert p.count("x") == 2 and p.count("y") == 1
    assert p.victim() == "y"
    p.on_remove("y")
    assert p.victim() == "x"
    p.on_insert("x", 1, 0.0)  # re-insert starts fresh
    assert p.count("x") == 1 and p.resident() == ["x"]


def test_ttl_expires_on_access_and_insert_and_evicts_closest_to_expiry() -> None:
    clock = FakeClock()
    rec = Recorder()
    m = manager(CacheStrategy.TTL, 3, listener=rec, clock=clock, ttl_seconds=10)
    m.put("a", ENTRY)  # expires at 10
    clock.now = 4
    m.put("b", ENTRY)  # 14
    clock.now = 6
    m.put("c", ENTRY)  # 16
    assert m.get("a") is not None  # a hit does not extend the TTL
    clock.now = 9
    m.put("d", ENTRY)  # full, nothing expired: a (closest to expiry) goes
    assert rec.evicted == [("a", "evicted")]
    clock.now = 14
    assert m.get("b") is None  # expired on access
    assert rec.evicted[-1] == ("b", "expired")
    clock.now = 16.5
    m.put("e", ENTRY)  # expired entries dropped on insert, no eviction needed
    assert rec.evicted[-1] == ("c", "expired")
    assert sorted(m.keys()) == ["d", "e"]
    assert m.stats()["expired"] == 2 and m.stats()["evictions"] == 1
    m._audit()


def test_ttl_replacement_restarts_the_clock() -> None:
    clock = FakeClock()
    m = manager(CacheStrategy.TTL, 3, clock=clock, ttl_seconds=10)
    m.put("a", ENTRY)
    clock.now = 8
    m.put("a", ENTRY)
    clock.now = 12
    assert m.contains("a")
    clock.now = 18
    assert not m.contains("a")


def test_arc_lists_and_adaptation() -> None:
    c = 4 * ENTRY_BYTES
    p = ARCPolicy(c)
    for key in "abcd":
        p.on_insert(key, ENTRY_BYTES, 0.0)
    assert list(p.t1) == ["a", "b", "c", "d"] and p.p == 0
    p.on_access("b", 0.0)  # seen twice -> T2
    assert list(p.t2) == ["b"]
    # |T1| = 3 KiB > p = 0: the T1 LRU goes, into the B1 ghost list.
    assert p.victim("e") == "a"
    p.on_evict("a")
    p.on_insert("e", ENTRY_BYTES, 0.0)
    assert list(p.b1) == ["a"] and "e" in p.t1
    # "a" comes back: a B1 ghost hit grows p by its size and puts it in T2.
    assert p.victim("a") == "c"  # p = 1 KiB now, |T1| = 3 KiB > p
    assert p.p == ENTRY_BYTES
    p.on_evict("c")
    p.on_insert("a", ENTRY_BYTES, 0.0)
    assert list(p.t2) == ["b", "a"] and "a" not in p.b1 and p.p == ENTRY_BYTES
    # Evict from T2 once T1 is within its target: p = 1 KiB, |T1| = 2 KiB -> T1 still.
    assert p.victim("f") == "d"
    p.on_evict("d")
    p.on_insert("f", ENTRY_BYTES, 0.0)  # T1 = [e, f] = 2 KiB
    p.p = 3 * ENTRY_BYTES  # pretend B1 hits grew the T1 target
    assert p.victim("g") == "b"  # |T1| <= p: T2's LRU
    p.on_evict("b")
    assert list(p.b2) == ["b"]
    # A B2 ghost hit shrinks p.
    before = p.p
    p.victim("b")
    assert p.p == before - ENTRY_BYTES * max(1.0, p.sizes()["b1"] / p.sizes()["b2"])
    assert sum(p.sizes()[k] for k in ("t1", "b1")) <= c
    assert sum(p.sizes().values()) <= 2 * c


def test_arc_ghost_lists_stay_bounded() -> None:
    c = 8 * ENTRY_BYTES
    p = ARCPolicy(c, ghost_limit=50)
    resident: list[str] = []
    for i in range(500):
        key = f"k{i % 37}" if i % 3 else f"s{i}"
        if key in resident:
            p.on_access(key, 0.0)
            continue
        while len(resident) >= 8:
            victim = p.victim(key)
            p.on_evict(victim)
            resident.remove(victim)
        p.on_insert(key, ENTRY_BYTES, 0.0)
        resident.append(key)
        sizes = p.sizes()
        assert sizes["t1"] + sizes["b1"] <= c
        assert sum(sizes.values()) <= 2 * c
        assert len(p.b1) + len(p.b2) <= 50
        assert sorted(p.resident()) == sorted(resident)
        assert 0 <= p.p <= c


def _hit_rate(strategy: CacheStrategy, sequence: list[str], entries: int) -> float:
    m = manager(strategy, entries)
    for key in sequence:
        if m.get(key) is None:
            m.put(key, ENTRY)
    return m.get_hit_rate()


def test_adaptive_beats_lru_on_scan_plus_hot_set() -> None:
    """100-entry cache; half the accesses go to a 60-key hot set, half to a one-time
    scan. LRU lets the scan push hot keys out; ARC keeps the hot keys in T2 and lets
    the scan churn through T1.

    Measured (seed 1, 6000 accesses): LRU 0.327, LFU 0.488, ADAPTIVE 0.490 (0.5 is the
    optimum: every hot access a hit). ARC needs no frequency history for this.
    """
    rng = random.Random(1)
    seq, scan = [], 0
    for _ in range(6000):
        if rng.random() < 0.5:
            seq.append(f"hot{rng.randrange(60)}")
        else:
            seq.append(f"scan{scan}")
            scan += 1
    rates = {s: _hit_rate(s, seq, 100) for s in CacheStrategy if s is not CacheStrategy.TTL}
    print({s.value: round(r, 3) for s, r in rates.items()})
    assert rates[CacheStrategy.ADAPTIVE] > rates[CacheStrategy.LRU] + 0.1
    assert rates[CacheStrategy.ADAPTIVE] > 0.45


def test_adaptive_beats_lfu_on_shifting_hot_set() -> None:
    """100-entry cache; four phases, each with its own 60-key hot set (90% of accesses)
    plus 10% random keys from 1000. LFU keeps the old phase's high-count keys and
    starves the new hot set; ARC follows the shift.

    Measured (seed 2, 4 x 1500 accesses): LRU 0.857, LFU 0.365, ADAPTIVE 0.853. ARC ties
    LRU here, not beats it: this workload is pure recency, which is LRU's best case; ARC
    pays a few misses per shift while its T1/T2 split readapts (asserted within 0.02).
    """
    rng = random.Random(2)
    seq = []
    for phase in range(4):
        for _ in range(1500):
            if rng.random() < 0.9:
                seq.append(f"p{phase}-{rng.randrange(60)}")
            else:
                seq.append(f"u{rng.randrange(1000)}")
    rates = {s: _hit_rate(s, seq, 100) for s in CacheStrategy if s is not CacheStrategy.TTL}
    print({s.value: round(r, 3) for s, r in rates.items()})
    assert rates[CacheStrategy.ADAPTIVE] > rates[CacheStrategy.LFU] + 0.2
    assert rates[CacheStrategy.ADAPTIVE] >= rates[CacheStrategy.LRU] - 0.02


@pytest.mark.parametrize("strategy", list(CacheStrategy))
def test_every_policy_tracks_exactly_the_resident_keys(strategy: CacheStrategy) -> None:
    clock = FakeClock()
    m = manager(strategy, 5, clock=clock, ttl_seconds=30)
    rng = random.Random(3)
    for _ in range(300):
        key = f"k{rng.randrange(12)}"
        clock.now += rng.random() * 3
        action = rng.random()
        if action < 0.5:
            m.put(key, ENTRY)
        elif action < 0.85:
            m.get(key)
        else:
            m.invalidate(key)
        m._audit()
