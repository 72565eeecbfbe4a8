"""What the text engines share: one background thread owns the model (vLLM's stepping
loop, or the transformers batcher) and caller threads wait on futures it settles.

The lifecycle around that thread is the same for both: build the model on it, start it,
refuse use from a forked child or after shutdown/breakage, and join it (bounded) when
stopping.

Why the model is built on the thread that runs it: libgomp gives every thread that starts
OpenMP regions a team of its own. A model loaded on the caller's thread (the Celery
worker's main thread) leaves that thread's team alive; once the engine thread starts a
second one the process has more OpenMP threads than CPUs, and libgomp then (as
documented for GOMP_SPINCOUNT) all but stops spinning between regions: the small ops of
a step wait for futex wakes and its helper thread did 8 of 61 CPU ticks instead of half.
Measured on the 2-core box, tiny Llama, 32 x 128 tokens: 6.3-6.9k tok/s stepping on a
second thread, 9.1-10.3k on the thread that built the engine (a 32x128x2048 matmul: 150
against 80 us). vLLM's own `LLM.generate` on the main thread: 9.7-10.4k.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError
from typing import Any

from omni_tasks.errors import EngineStoppedError, ProcessingError
from workers.progress import ProgressCallback

log = logging.getLogger(__name__)


def set_cpu_threads(threads: int | None = None) -> None:
    """Torch's threads for a model on the CPU; default: all CPUs this process may use but
    one (1 on a 2-core box), left to the worker's Python threads and Redis, as vLLM's own
    CPU default reserves one. With every CPU in the model's OpenMP team, any busy
    neighbour stalls each parallel region. vLLM, 32 x 128 tokens on the 2-core box: alone
    10k tok/s with 2 threads, 9.1-9.5k with 1; while another process ran, 0.3-2k with 2;
    through the Celery worker, 0.3-4.3k with 2 and 5.2-6.8k with 1."""
    import torch

    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) - 1))


def notify_progress(callback: ProgressCallback, info: Mapping[str, int]) -> None:
    """Call a caller's progress callback from the engine's thread; its failure is logged,
    never raised into the engine."""
    try:
        callback(info)
    except Exception:  # noqa: BLE001 - progress is advisory
        log.warning("progress callback failed", exc_info=True)


def wait_for_burst(
    cond: threading.Condition, arrivals: Callable[[], int | None], gap_s: float, max_s: float
) -> None:
    """(Holding `cond`, notified on each arrival) wait while requests keep arriving, each
    within `gap_s` of the last, for at most `max_s`. `arrivals()` counts them, or returns
    None to stop waiting (a full batch, shutdown)."""
    end = time.monotonic() + max_s
    seen = arrivals()
    while seen is not None:
        left = end - time.monotonic()
        if left <= 0:
            return
        cond.wait(min(gap_s, left))
        now = arrivals()
        if now == seen:
            return  # a gap: the burst is over
        seen = now


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

    def _start_thread(
        self,
        target: Callable[[], None],
        name: str,
        build: Callable[[], None] | None = None,
    ) -> None:
        """Start the engine's thread: it runs `build` (loading the model, see the module
        docstring), then `target`. Returns once `build` is done; re-raises its error."""
        self._stopping = False
        self._broken: BaseException | None = None
        self._pid = os.getpid()
        built = threading.Event()
        failed: list[BaseException] = []

        def main() -> None:
            try:
                if build is not None:
                    build()
            except BaseException as exc:  # handed to the constructor's caller
                failed.append(exc)
                return
            finally:
                built.set()
            target()

        self._thread = threading.Thread(target=main, name=name, daemon=True)
        self._thread.start()
        built.wait()
        if failed:
            self._thread.join()
            raise failed[0]
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


class OneModelEngine(BackgroundThreadEngine):
    """An engine whose thread drives one torch `model` on `device`, woken through
    `_cond`: what its seeded runs and its release share."""

    device: str
    model: Any
    _cond: threading.Condition

    @staticmethod
    def pick_device(device: str) -> str:
        """`device`, or for "auto" CUDA when there is one, else the CPU."""
        import torch

        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return device

    def torch_dtype(self, dtype: str) -> Any:
        """The dtype to load in: "auto" is the checkpoint's on a GPU and float32 on a CPU
        (bf16/fp16 checkpoints crawl on CPUs without native support)."""
        import torch

        if dtype == "auto":
            return "auto" if self.device != "cpu" else torch.float32
        return getattr(torch, dtype)

    def _rng_devices(self) -> list[int]:
        """The CUDA device whose generator a seeded run forks (none on a CPU)."""
        import torch

        if self.device.startswith("cuda"):
            return [torch.device(self.device).index or 0]
        return []

    def _close(self) -> None:
        """Stop taking work and free the model's memory."""
        with self._cond:
            self._stopping = True
        self.model = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
