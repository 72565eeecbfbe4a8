"""Coalescing: callers that arrive while a batched call runs are served by the next one.

Requests sent together reach a worker together; their text encoders (and VAE decodes)
are cheaper run once on a batch than once per request, the way the transformer's steps
are. The first caller runs the function on everything queued (up to `max_items`); the
ones that arrive meanwhile wait and go together in the next call. One call runs at a
time, which also serializes what is not thread-safe (fast tokenizers).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class _Slot(Generic[K]):
    __slots__ = ("done", "error", "item", "value")

    def __init__(self, item: K) -> None:
        self.item = item
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None


class Coalescer(Generic[K, V]):
    """`fn` maps a list of items to a list of results, one per item, in order."""

    def __init__(self, fn: Callable[[list[K]], Sequence[V]], max_items: int = 16) -> None:
        self._fn = fn
        self._max = max_items
        self._cond = threading.Condition()
        self._queue: list[_Slot[K]] = []
        self._busy = False

    def __call__(self, item: K) -> V:
        slot = _Slot(item)
        with self._cond:
            self._queue.append(slot)
            while not slot.done:
                if self._busy:
                    self._cond.wait()
                    continue
                batch, self._queue = self._queue[: self._max], self._queue[self._max :]
                self._busy = True
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
        if slot.error is not None:
            raise slot.error
        return slot.value

    def _run(self, batch: list[_Slot[K]]) -> None:
        try:
            values = self._fn([slot.item for slot in batch])
        except BaseException as exc:
            for slot in batch:
                slot.error, slot.done = exc, True
            return
        for slot, value in zip(batch, values, strict=True):
            slot.value, slot.done = value, True
