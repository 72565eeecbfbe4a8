"""DiTCacheManager: exact accounting, the budget bound, refusal, copies, threads, listener."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import zlib

import pytest
import torch

from omni_tasks.config import CacheConfig, CacheStrategy
from omni_tasks.errors import CacheError
from workers.dit_cache import GIB, DiTCacheManager
from workers.dit_cache.sizing import value_nbytes

KIB = 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Mirror:
    """A listener that replays the events into a dict, like a Redis directory would."""

    def __init__(self) -> None:
        self.keys: dict[str, int] = {}
        self.reasons: list[str] = []
        self.lock = threading.Lock()

    def on_insert(self, key: str, nbytes: int) -> None:
        with self.lock:
            assert key not in self.keys, f"insert of resident {key}"
            self.keys[key] = nbytes

    def on_evict(self, key: str, reason: str) -> None:
        with self.lock:
            assert reason in ("evicted", "expired", "invalidated", "replaced", "cleared")
            assert key in self.keys, f"{reason} of absent {key}"
            del self.keys[key]
            self.reasons.append(reason)


def make(
    budget_bytes: int,
    strategy: CacheStrategy = CacheStrategy.LRU,
    compression: bool = False,
    ratio: float = 0.7,
    **kwargs,
) -> DiTCacheManager:
    config = CacheConfig(
        max_memory_gib=budget_bytes / GIB,
        strategy=strategy,
        ttl_seconds=kwargs.pop("ttl_seconds", 3600),
        enable_compression=compression,
        compression_ratio=ratio,
    )
    return DiTCacheManager(config, **kwargs)


def f32(kib: float) -> torch.Tensor:
    return torch.randn(int(kib * KIB) // 4)


def test_accounting_after_insert_replace_invalidate_evict() -> None:
    mirror = Mirror()
    m = make(10 * KIB, listener=mirror)
    assert m.put("a", f32(3)) and m.stats()["bytes"] == 3 * KIB
    assert m.put("b", {"x": f32(2), "y": [f32(1), 7, "s"]})
    assert m.stats()["bytes"] == 6 * KIB
    assert m.put("a", f32(1))  # replacement
    assert m.stats()["bytes"] == 4 * KIB
    assert m.invalidate("b") and not m.invalidate("b")
    assert m.stats()["bytes"] == 1 * KIB
    for key in "cde":
        m.put(key, f32(3))  # 1 + 9 = 10 KiB: fits exactly
    assert m.stats()["bytes"] == 10 * KIB and m.stats()["evictions"] == 0
    m.put("f", f32(4))  # evicts a (1) and c (3): 10 - 4 + 4
    assert sorted(m.keys()) == ["d", "e", "f"]
    stats = m.stats()
    assert stats["bytes"] == 10 * KIB and stats["evictions"] == 2 and stats["entries"] == 3
    assert m._audit() == 10 * KIB
    assert mirror.keys == {"d": 3 * KIB, "e": 3 * KIB, "f": 4 * KIB}
    assert mirror.reasons == ["replaced", "invalidated", "evicted", "evicted"]
    m.clear()
    assert m.stats()["bytes"] == 0 and m.keys() == [] and mirror.keys == {}
    assert mirror.reasons[-3:] == ["cleared"] * 3


def test_views_and_expanded_tensors_are_stored_compactly() -> None:
    m = make(64 * KIB)
    base = f32(32)
    view = base[:256]  # 1 KiB view of a 32 KiB storage
    expanded = torch.zeros(1, 64).expand(16, 64)  # 4 KiB of elements, 256 B storage
    m.put("v", {"view": view, "again": view, "exp": expanded})
    assert m.stats()["bytes"] == 1 * KIB + 1 * KIB + 4 * KIB
    stored = m._entries["v"].stored
    for t in (stored["view"], stored["again"], stored["exp"]):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    m._audit()


def test_entry_larger_than_budget_is_refused_without_evicting(caplog) -> None:
    mirror = Mirror()
    m = make(8 * KIB, listener=mirror)
    m.put("a", f32(4))
    m.put("b", f32(4))
    with caplog.at_level(logging.WARNING, logger="workers.dit_cache.manager"):
        assert m.put("huge", f32(9)) is False
    assert "refused" in caplog.text
    assert sorted(m.keys()) == ["a", "b"] and m.stats()["evictions"] == 0
    assert m.stats()["refused"] == 1 and m.stats()["bytes"] == 8 * KIB
    with pytest.raises(CacheError):
        asyncio.run(m.set_cache("huge", f32(9)))
    assert m.stats()["refused"] == 2 and sorted(m.keys()) == ["a", "b"]
    # A refused replacement drops the superseded value, nothing else.
    assert m.put("a", f32(9)) is False
    assert m.keys() == ["b"] and m.stats()["bytes"] == 4 * KIB
    assert mirror.keys == {"b": 4 * KIB}
    m._audit()


def test_compressed_size_decides_refusal() -> None:
    m = make(8 * KIB, compression=True, ratio=0.5)
    assert m.put("fits-when-fp16", f32(12))  # 12 KiB fp32 -> 6 KiB fp16
    assert m.stats()["bytes"] == 6 * KIB
    assert not m.put("too-big", f32(20))


@pytest.mark.parametrize("compression", [False, True], ids=["raw", "compressed"])
@pytest.mark.parametrize("strategy", list(CacheStrategy), ids=lambda s: s.value)
def test_random_operations_keep_exact_accounting(strategy, compression) -> None:
    """2000 random ops; after each: bytes == recount of stored tensors <= budget, the
    policy tracks exactly the entries, and the listener's mirror equals the cache."""
    rng = random.Random(zlib.crc32(f"{strategy.value}-{compression}".encode()) & 0xFFFF)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    clock, mirror = FakeClock(), Mirror()
    budget = 48 * KIB
    m = make(budget, strategy, compression, 0.3, clock=clock, listener=mirror, ttl_seconds=20)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64]

    def random_value():
        shape = (rng.randint(1, 24), rng.choice([1, 7, 64, 128]))
        if rng.random() < 0.03:
            shape = (130, 128)  # 65 KiB fp32: over the budget
        t = (torch.randn(shape, generator=gen) * 10).to(rng.choice(dtypes))
        if rng.random() < 0.2:
            return {"t": t, "pair": (t[: shape[0] // 2 + 1], rng.random()), "step": 3}
        return t

    for _ in range(2000):
        key = f"k{rng.randrange(30)}"
        clock.now += rng.random()
        op = rng.random()
        if op < 0.45:
            value = random_value()
            before = m.stats()
            others = set(m.keys()) - {key}
            ok = m.put(key, value)
            if not compression:
                assert ok == (value_nbytes(value) <= budget)
            if not ok:  # refused: nothing else evicted for it
                after = m.stats()
                assert after["evictions"] == before["evictions"]
                assert set(m.keys()) == others
        elif op < 0.8:
            got = m.get(key)
            assert (got is None) or m.contains(key)
        elif op < 0.95:
            m.invalidate(key)
        elif op < 0.995:
            m.contains(key)
        else:
            m.clear()
        assert m._audit() == m.stats()["bytes"] <= budget
        assert mirror.keys == {k: m._entries[k].nbytes for k in m.keys()}
    stats = m.stats()
    assert stats["evictions"] > 0 and stats["hits"] > 0 and stats["refused"] > 0
    if strategy is CacheStrategy.TTL:
        assert stats["expired"] > 0


def test_get_returns_a_private_copy_on_the_device() -> None:
    m = make(64 * KIB)
    x = f32(4)
    original = x.clone()
    m.put("x", {"t": x})
    x.add_(1)  # the caller changes its tensor after put
    got = m.get("x")["t"]
    assert torch.equal(got, original) and got.device == torch.device("cpu")
    got.zero_()  # the caller changes what it got
    assert torch.equal(m.get("x")["t"], original)


def test_compressed_get_restores_dtype_shape_and_values() -> None:
    m = make(1024 * KIB, compression=True, ratio=0.7)
    value = {"latents": torch.randn(1, 256, 64), "emb": torch.randn(1, 77, 768).bfloat16()}
    m.put("k", value)
    stats = m.stats()
    assert stats["bytes"] <= 0.7 * value_nbytes(value)
    got = m.get("k")
    for name, t in value.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert (got[name].float() - t.float()).abs().max() <= 0.01 * t.float().abs().max()


def test_unsupported_values_raise_cache_error() -> None:
    m = make(64 * KIB)
    with pytest.raises(CacheError):
        m.put("bad", {"x": object()})
    with pytest.raises(CacheError):
        m.put("bad", b"bytes are not weighed")
    with pytest.raises(TypeError):
        m.put(3, f32(1))  # type: ignore[arg-type]
    assert m.keys() == []


def test_hit_rate_memory_usage_and_seed_attributes() -> None:
    m = make(2 * GIB // 1024)  # 2 MiB
    assert m.get_hit_rate() == 0.0 and m.get_memory_usage() == 0.0
    m.put("a", f32(512))  # 512 KiB
    m.get("a")
    m.get("a")
    m.get("b")
    assert m.get_hit_rate() == pytest.approx(2 / 3)
    assert m.cache_stats == {"hits": 2, "misses": 1}
    assert m.get_memory_usage() == pytest.approx(512 * KIB / 2**30)
    assert m.memory_usage == m.get_memory_usage() and GIB == 2**30
    assert m.stats()["max_bytes"] == 2 * 2**20 and m.config.max_memory_gib == 2 / 1024


def test_async_seed_methods() -> None:
    m = make(64 * KIB)

    async def scenario() -> None:
        assert await m.get_cache("k") is None
        await m.set_cache("k", {"x": f32(1)})
        got = await m.get_cache("k")
        assert got["x"].numel() == 256
        await m.invalidate_cache("k")
        await m.invalidate_cache("k")  # absent: no error
        assert await m.get_cache("k") is None

    asyncio.run(scenario())
    assert m.cache_stats == {"hits": 1, "misses": 2}


def test_listener_failure_does_not_break_the_cache(caplog) -> None:
    class Broken:
        def on_insert(self, key: str, nbytes: int) -> None:
            raise RuntimeError("redis down")

        def on_evict(self, key: str, reason: str) -> None:
            raise RuntimeError("redis down")

    m = make(4 * KIB, listener=Broken())
    with caplog.at_level(logging.WARNING, logger="workers.dit_cache.manager"):
        for i in range(5):
            assert m.put(f"k{i}", f32(2))
    # One line for the run of failures (an outage of the directory), not one per event.
    assert caplog.text.count("DiT cache directory failed") == 1
    assert sorted(m.keys()) == ["k3", "k4"]
    m._audit()


@pytest.mark.parametrize(
    "strategy,compression,seconds",
    [(CacheStrategy.ADAPTIVE, True, 1.0), (CacheStrategy.LRU, False, 0.5)],
    ids=["adaptive-compressed", "lru-raw"],
)
def test_threads_keep_accounting_exact(strategy, compression, seconds) -> None:
    """8 threads put/get/invalidate for a second (half for lru-raw); a watcher samples
    the byte count meanwhile; at the end the recount and the listener's mirror agree."""
    budget = 64 * KIB
    mirror = Mirror()
    m = make(budget, strategy, compression, 0.5, listener=mirror)
    stop = threading.Event()
    errors: list[BaseException] = []
    peak = [0]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                key = f"k{rng.randrange(40)}"
                op = rng.random()
                if op < 0.5:
                    m.put(key, {"t": torch.randn(rng.randint(1, 16), 128)})
                elif op < 0.9:
                    got = m.get(key)
                    assert got is None or got["t"].shape[1] == 128
                else:
                    m.invalidate(key)
                assert m.stats()["bytes"] <= budget
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def watcher() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], m.stats()["bytes"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=watcher))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert 0 < peak[0] <= budget
    assert m._audit() <= budget
    assert mirror.keys == {k: m._entries[k].nbytes for k in m.keys()}
    stats = m.stats()
    assert stats["evictions"] > 0 and stats["hits"] > 0


def test_clear_keeps_counters_and_resets_policy() -> None:
    m = make(4 * KIB, CacheStrategy.ADAPTIVE)
    for i in range(6):
        m.put(f"k{i}", f32(1))
        m.get(f"k{i}")
    m.clear()
    assert m.stats()["hits"] == 6 and m.stats()["entries"] == 0
    assert m._policy.resident() == [] and not m._policy.b1 and not m._policy.b2


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("compression", [False, True], ids=["raw", "compressed"])
def test_cuda_cache_device(compression: bool) -> None:
    m = make(1024 * KIB, compression=compression, ratio=0.3, device="cuda")
    assert m.device.type == "cuda" and m.device.index is not None
    value = {"x": torch.randn(64, 128), "y": torch.randn(32, 64, device="cuda").bfloat16()}
    assert m.put("k", value)
    for t in m._entries["k"].stored.values():
        for tensor in getattr(t, "tensors", lambda t=t: (t,))():
            assert tensor.device == m.device
    got = m.get("k")
    for name, t in value.items():
        assert got[name].device == m.device and got[name].dtype == t.dtype
        err = (got[name].float().cpu() - t.float().cpu()).abs().max()
        assert err <= 0.08 * t.float().abs().max().cpu()
    m._audit()


@cuda
def test_cuda_values_cached_on_cpu() -> None:
    m = make(1024 * KIB, compression=True, ratio=0.7, device="cpu")
    x = torch.randn(256, 256, device="cuda")
    assert m.put("k", x)
    assert m.stats()["bytes"] == x.numel() * 2
    got = m.get("k")
    assert got.device.type == "cpu" and got.dtype == torch.float32
    assert (got - x.cpu()).abs().max() <= 2**-11 * x.abs().max().cpu()


def test_lossless_entries_skip_compression() -> None:
    import torch

    from omni_tasks.config import CacheConfig
    from workers.dit_cache import DiTCacheManager

    cache = DiTCacheManager(CacheConfig(max_memory_gib=0.01, compression_ratio=0.5))
    value = torch.randn(64, 64)
    cache.put("lossy", value)
    cache.put("exact", value, lossless=True)
    assert torch.equal(cache.get("exact"), value)
    assert not torch.equal(cache.get("lossy"), value)
    assert cache.stats()["bytes"] == value.nbytes + value.nbytes // 2  # fp32 + fp16 copy
