"""The adapter cache's rules: least recently used out first, never a pinned adapter,
waiting for room up to a deadline, refusing what can never fit, loading once.

The loader here keeps its "model" in a dict; what it records is what the cache asked of
it (the Flux engine's real loader is tested in test_lora_diffusion.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from omni_tasks.errors import ProcessingError, RequestTimeoutError, ResourceError
from workers.lora.cache import AdapterCache

SIZES = {"a": 40, "b": 40, "c": 40, "big": 1000, "broken": 10}


class DictLoader:
    def __init__(self, load_delay_s: float = 0.0) -> None:
        self.model: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        self.delay = load_delay_s

    def read(self, name: str) -> tuple[int, Any]:
        return SIZES[name], f"weights of {name}"

    def load(self, name: str, payload: Any, evict: list[str]) -> int:
        for victim in evict:
            self.calls.append(("unload", victim))
            del self.model[victim]
        self.calls.append(("load", name))
        time.sleep(self.delay)
        if name == "broken":
            raise ValueError("bad tensors")
        assert payload == f"weights of {name}"
        self.model[name] = SIZES[name]
        return SIZES[name]


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def on_insert(self, key: str, nbytes: int) -> None:
        self.seen.append(("insert", key))

    def on_evict(self, key: str, reason: str) -> None:
        self.seen.append(("evict", key))


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def use(cache: AdapterCache, *names: str) -> dict[str, tuple[bool, float]]:
    served = cache.acquire(list(names), soon())
    cache.release(list(names))
    return served


def test_least_recently_used_goes_first_and_the_budget_holds() -> None:
    loader, events = DictLoader(), Events()
    cache = AdapterCache(100, loader, events)  # room for two of 40
    assert use(cache, "a")["a"][0] is False
    use(cache, "b")
    assert use(cache, "a")["a"] == (True, 0.0)  # a is now the most recent
    use(cache, "c")  # needs room: b goes
    assert cache.loaded() == ["a", "c"] and set(loader.model) == {"a", "c"}
    assert cache.used() == 80 <= cache.budget
    assert events.seen == [("insert", "a"), ("insert", "b"), ("evict", "b"), ("insert", "c")]
    assert cache.stats() == {
        "hits": 1,
        "loads": 3,
        "evictions": 1,
        "adapters": 2,
        "used": 80,
        "budget": 100,
    }


def test_a_pinned_adapter_is_never_unloaded_and_a_waiter_gets_room_on_release() -> None:
    loader = DictLoader()
    cache = AdapterCache(80, loader)
    cache.acquire(["a", "b"], soon())  # a running request holds both
    got: dict[str, Any] = {}

    def wait_for_c() -> None:
        got.update(cache.acquire(["c"], soon()))

    waiter = threading.Thread(target=wait_for_c)
    waiter.start()
    time.sleep(0.2)  # time for the waiter to get "c" if it wrongly could
    assert not got and set(loader.model) == {"a", "b"}
    cache.release(["a", "b"])
    waiter.join(5)
    assert got["c"][0] is False and set(loader.model) == {"b", "c"}  # a was least recent


def test_waiting_for_room_ends_at_the_deadline() -> None:
    cache = AdapterCache(80, DictLoader())
    cache.acquire(["a", "b"], soon())
    with pytest.raises(RequestTimeoutError, match="adapter budget"):
        cache.acquire(["c"], time.monotonic() + 0.3)
    cache.release(["a", "b"])
    assert use(cache, "c")["c"][0] is False  # the timed-out request left no pin behind


def test_an_adapter_larger_than_the_budget_is_refused_at_once() -> None:
    loader = DictLoader()
    cache = AdapterCache(100, loader)
    use(cache, "a")
    with pytest.raises(ResourceError, match="never be loaded"):
        cache.acquire(["big"], soon())
    assert cache.loaded() == ["a"] and loader.calls == [("load", "a")]


def test_concurrent_requests_load_a_missing_adapter_once() -> None:
    loader = DictLoader(load_delay_s=0.2)
    cache = AdapterCache(100, loader)
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(use(cache, "a"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert loader.calls == [("load", "a")]
    assert sorted(r["a"][0] for r in results) == [False, True, True, True]


def test_a_failed_load_is_an_error_naming_the_adapter_and_reserves_nothing() -> None:
    cache = AdapterCache(100, DictLoader())
    with pytest.raises(ProcessingError, match="'broken' could not be loaded"):
        cache.acquire(["a", "broken"], soon())
    assert cache.used() == 40  # a stays loaded, unpinned; nothing reserved for broken
    use(cache, "b")
    assert cache.loaded() == ["a", "b"]
