"""What the text engines share: one background thread owns the model (vLLM's stepping
loop, or the transformers batcher) and caller threads wait on futures it settles.

The lifecycle around that thread is the same for both: start it, refuse use from a
forked child or after shutdown/breakage, and join it (bounded) when stopping.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from omni_tasks.errors import EngineStoppedError, ProcessingError

log = logging.getLogger(__name__)


def settle(fut: Future, result: Any = None, exc: BaseException | None = None) -> None:
    """Resolve `fut` unless someone (timeout, shutdown) already did."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


class BackgroundThreadEngine:
    """Base of an engine whose model is driven by one daemon thread."""

    #: How errors and logs name the engine, e.g. "vLLM engine".
    label = "engine"

    def _start_thread(self, target: Callable[[], None], name: str) -> None:
        self._stopping = False
        self._broken: BaseException | None = None
        self._pid = os.getpid()
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()
        # A daemon never blocks interpreter exit: stop it (and wait for it) before the
        # interpreter tears modules down under its feet.
        atexit.register(self.shutdown)

    def shutdown(self, timeout_s: float = 30.0) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _join_thread(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the thread (0: return at once; never from itself)."""
        if timeout_s > 0 and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("%s thread still busy after %.0f s", self.label, timeout_s)

    @property
    def healthy(self) -> bool:
        """False once stopped or broken; a worker should then stop consuming."""
        return not self._stopping and self._broken is None

    def _check_process(self) -> None:
        # A forked child (prefork pool) inherits this object but not its thread (and
        # maybe a lock held at fork time): fail fast before touching either.
        if os.getpid() != self._pid:
            raise ProcessingError(
                f"{self.label} was built in another process; build one per worker process"
            )

    def _raise_if_unavailable(self) -> None:
        # Broken first: a task seeing EngineStoppedError requeues its message, and a
        # broken worker would then bounce every message back to the queue.
        if self._broken is not None:
            raise ProcessingError(f"{self.label} is broken: {self._broken!r}")
        if self._stopping:
            raise EngineStoppedError(f"{self.label} is shut down")
