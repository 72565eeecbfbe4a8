"""The adapters one model keeps loaded: least recently used first out, under a budget,
never one that a running request uses.

A request pins its adapters for as long as it runs (`acquire` ... `release`); a missing
adapter is read (on the caller's thread: file I/O), then room is made by unloading
unpinned adapters, least recently used first, and it is loaded, in one call to the
loader (which decides where: the diffusion engine does both on its step loop's thread,
between two steps). When pinned adapters
fill the budget the request waits for one to be released, up to its deadline. An
adapter larger than the whole budget is refused at once (`ResourceError`).

Costs are whatever the loader counts: device bytes for a diffusion model, or 1 per adapter for a
budget in adapters. Every load and unload is reported to the `listener` (the Redis
directory), outside the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from omni_tasks.coordination.outage import Outage
from omni_tasks.errors import ProcessingError, RequestTimeoutError, ResourceError

log = logging.getLogger(__name__)
_outage = Outage("adapter directory", log)


class AdapterLoader(Protocol):
    """How one model reads, loads and unloads adapters by registry name."""

    def read(self, name: str) -> tuple[int, Any]:
        """(its cost once loaded, what `load` takes): file I/O, any thread."""

    def load(self, name: str, payload: Any, evict: list[str]) -> int:
        """Remove the adapters `evict` from the model (logging what fails), then load
        `name` into it; its measured cost. One call, so that a loader that changes the
        model between two steps waits for one step boundary, not two."""


class AdapterListener(Protocol):
    def on_insert(self, key: str, nbytes: int) -> None: ...

    def on_evict(self, key: str, reason: str) -> None: ...


@dataclass(frozen=True)
class AdapterUse:
    """One adapter a request ran with: loaded already (`hit`), or loaded for it in `load_s`
    seconds. `hit` is None when no adapter ran (the result came from the DiT cache)."""

    name: str
    scale: float
    hit: bool | None
    load_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale, "hit": self.hit, "load_s": self.load_s}


class AdapterCache:
    """Loaded adapters of one model (see the module docstring); thread-safe."""

    def __init__(
        self, budget: int, loader: AdapterLoader, listener: AdapterListener | None = None
    ) -> None:
        self.budget = int(budget)
        self.loader = loader
        self.listener = listener
        self._cond = threading.Condition()
        self._loaded: OrderedDict[str, int] = OrderedDict()  # name -> cost, LRU first
        self._pins: Counter[str] = Counter()
        self._loading: dict[str, int] = {}  # name -> cost reserved while it loads
        self.counters = {"hits": 0, "loads": 0, "evictions": 0}

    # --- requests ------------------------------------------------------------------------

    def acquire(self, names: Sequence[str], deadline: float) -> dict[str, tuple[bool, float]]:
        """Pin `names`, loading the missing ones; name -> (hit, load seconds).
        `deadline` is on `time.monotonic()`."""
        with self._cond:
            self._pins.update(names)  # first: nothing this request needs goes meanwhile
        try:
            return {name: self._ensure(name, deadline) for name in names}
        except BaseException:
            self.release(names)
            raise

    def release(self, names: Sequence[str]) -> None:
        with self._cond:
            self._pins.subtract(names)
            self._pins += Counter()  # drops counts at zero
            self._cond.notify_all()

    # --- figures -------------------------------------------------------------------------

    def used(self) -> int:
        """The cost of what is loaded or loading."""
        with self._cond:
            return sum(self._loaded.values()) + sum(self._loading.values())

    def loaded(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        with self._cond:
            return list(self._loaded)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                **self.counters,
                "adapters": len(self._loaded),
                "used": sum(self._loaded.values()),
                "budget": self.budget,
            }

    # --- internals -----------------------------------------------------------------------

    def _ensure(self, name: str, deadline: float) -> tuple[bool, float]:
        with self._cond:
            self._wait(lambda: name not in self._loading, name, deadline)
            if name in self._loaded:
                self._loaded.move_to_end(name)
                self.counters["hits"] += 1
                return True, 0.0
        start = time.perf_counter()
        cost, payload = self.loader.read(name)
        if cost > self.budget:
            raise ResourceError(
                f"adapter {name!r} needs {cost} of the adapter budget of {self.budget} "
                "(lora.memory_gib): it can never be loaded on this worker"
            )
        victims = self._reserve(name, cost, deadline)
        if victims is None:  # loaded by another request while this one read it
            return True, 0.0
        try:
            measured = self.loader.load(name, payload, victims)
        except BaseException as exc:
            with self._cond:
                self._loading.pop(name, None)
                self._cond.notify_all()
            if isinstance(exc, Exception) and not isinstance(exc, ProcessingError):
                raise ProcessingError(f"adapter {name!r} could not be loaded: {exc}") from exc
            raise
        finally:
            for victim in victims:
                self._notify("evict", victim, "evicted")
        with self._cond:
            self._loading.pop(name, None)
            self._loaded[name] = measured
            self.counters["loads"] += 1
            self._cond.notify_all()
        self._notify("insert", name, measured)
        return False, time.perf_counter() - start

    def _reserve(self, name: str, cost: int, deadline: float) -> list[str] | None:
        """Reserve `cost` for `name`, choosing the adapters to unload for it; None when
        `name` got loaded meanwhile."""
        with self._cond:
            while True:
                self._wait(lambda: name not in self._loading, name, deadline)
                if name in self._loaded:
                    self._loaded.move_to_end(name)
                    self.counters["hits"] += 1
                    return None
                victims = self._victims(cost)
                if victims is not None:
                    break
                self._wait_once(name, deadline)
            for victim in victims:
                self._loaded.pop(victim)
            self.counters["evictions"] += len(victims)
            self._loading[name] = cost
            return victims

    def _victims(self, cost: int) -> list[str] | None:
        """Unpinned adapters, least recently used first, whose unloading makes room for
        `cost`; None when the pinned ones leave too little (lock held)."""
        free = self.budget - sum(self._loaded.values()) - sum(self._loading.values())
        victims: list[str] = []
        for other, other_cost in self._loaded.items():
            if free >= cost:
                break
            if self._pins[other] == 0:
                victims.append(other)
                free += other_cost
        return victims if free >= cost else None

    def _wait(self, ready: Any, name: str, deadline: float) -> None:
        while not ready():
            self._wait_once(name, deadline)

    def _wait_once(self, name: str, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeoutError(
                f"timed out waiting for room to load adapter {name!r}: the adapters of "
                "running requests fill the adapter budget (lora.memory_gib)"
            )
        self._cond.wait(min(left, 1.0))

    def _notify(self, kind: str, name: str, arg: Any) -> None:
        if self.listener is not None:  # the directory is an optimisation
            _outage.run(self._tell, self.listener, kind, name, arg)

    @staticmethod
    def _tell(listener: Any, kind: str, name: str, arg: Any) -> None:
        if kind == "insert":
            listener.on_insert(name, int(arg))
        else:
            listener.on_evict(name, str(arg))
