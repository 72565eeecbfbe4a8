"""The engines of one worker process: built once, shared by every task thread.

`start` runs from Celery's `worker_init` (threads/solo pools) or
`worker_process_init` (prefork), so the worker reports ready only once its models are
loaded; `stop` aborts in-flight requests so a warm shutdown hands them back promptly.
Engines are also built lazily on first use (eager mode, scripts).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

from omni_tasks import cache_directory
from omni_tasks.config import CoreModuleConfig, get_config
from omni_tasks.errors import EngineStoppedError
from workers.engines.base import DiffusionEngine, TextEngine
from workers.models import TINY_MODELS, build_tiny_model

log = logging.getLogger(__name__)


def resolve_model(name: str, config: CoreModuleConfig) -> str:
    """A local path, a tiny model under `models_dir` (built if missing), or a hub id."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name in TINY_MODELS:
        target = config.models_path() / name
        return str(build_tiny_model(name, target))
    return name


class WorkerRuntime:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._text: TextEngine | None = None
        self._diffusion: DiffusionEngine | None = None
        self._dit_cache: Any = None
        self._stopped = False
        self._stop_lock = threading.Lock()
        self._stop_done = threading.Event()

    def start(self, stages: list[str], config: CoreModuleConfig | None = None) -> None:
        """Build the engines of the given stages ("ar", "dit") now."""
        for stage in stages:
            if stage == "ar":
                self.text_engine(config)
            elif stage == "dit":
                self.diffusion_engine(config)

    def text_engine(self, config: CoreModuleConfig | None = None) -> TextEngine:
        with self._lock:
            self._check_running()
            if self._text is None:
                self._text = build_text_engine(config or get_config())
            return self._text

    def diffusion_engine(self, config: CoreModuleConfig | None = None) -> DiffusionEngine:
        with self._lock:
            self._check_running()
            if self._diffusion is None:
                self._diffusion = build_diffusion_engine(config or get_config())
            return self._diffusion

    @property
    def built_dit_cache(self) -> Any:
        """The DiT cache if this process has built one (None otherwise); builds nothing."""
        return self._dit_cache

    def dit_cache(self, config: CoreModuleConfig | None = None) -> Any:
        """The worker-local DiT cache, on the diffusion engine's device, mirrored in Redis."""
        engine = self.diffusion_engine(config)
        with self._lock:
            if self._dit_cache is None:
                from workers.dit_cache import DiTCacheManager

                config = config or get_config()
                listener = RedisDirectoryListener(worker_identity(), config.diffusion.queue)
                device = getattr(engine, "device", "cpu")
                self._dit_cache = DiTCacheManager(config.cache, device=device, listener=listener)
            return self._dit_cache

    def stop(self, timeout_s: float = 60.0) -> None:
        """Abort in-flight requests (they raise EngineStoppedError) and free the engines.

        Idempotent; a second caller (the worker's final shutdown hook) waits until the
        first has finished, so the process never exits under a closing engine.
        """
        self._stopped = True
        if not self._stop_lock.acquire(blocking=False):
            self._stop_done.wait(timeout_s)
            return
        try:
            for engine in (self._text, self._diffusion):
                if engine is not None:
                    try:
                        engine.shutdown()
                    except Exception:
                        log.exception("engine %s did not shut down cleanly", engine.name)
        finally:
            self._stop_done.set()

    def _check_running(self) -> None:
        if self._stopped:
            raise EngineStoppedError("this worker is shutting down")


def worker_identity() -> str:
    """This worker's Celery hostname (the name the Redis directory uses)."""
    from omni_tasks.worker_hooks import state

    return state.hostname or f"{socket.gethostname()}-{os.getpid()}"


class RedisDirectoryListener:
    """Mirrors every insert and removal of the DiT cache into the Redis directory."""

    def __init__(self, worker: str, pool: str) -> None:
        self.worker, self.pool = worker, pool

    def on_insert(self, key: str, nbytes: int) -> None:
        cache_directory.record_insert(self.worker, self.pool, key, nbytes)

    def on_evict(self, key: str, reason: str) -> None:
        cache_directory.record_remove(self.worker, key)


def build_text_engine(config: CoreModuleConfig) -> TextEngine:
    ar = config.ar
    model = resolve_model(ar.model, config)
    log.info("loading %s text engine for %s", ar.engine, model)
    if ar.engine == "transformers":
        from workers.engines.transformers_engine import TransformersTextEngine

        return TransformersTextEngine(model, dtype=ar.dtype, max_batch_size=ar.max_batch_size)
    from workers.engines.vllm_engine import VllmTextEngine

    return VllmTextEngine(
        model,
        dtype=ar.dtype,
        max_model_len=ar.max_model_len,
        max_num_seqs=ar.concurrency,
        gpu_memory_utilization=config.max_gpu_utilization,
        tensor_parallel_size=ar.tensor_parallel_size,
        kv_cache_gib=ar.kv_cache_gib,
    )


def build_diffusion_engine(config: CoreModuleConfig) -> DiffusionEngine:
    from workers.engines.diffusers_engine import FluxDiffusionEngine

    dit = config.diffusion
    model = resolve_model(dit.model, config)
    log.info("loading diffusion engine for %s", model)
    return FluxDiffusionEngine(model, device=dit.device, dtype=dit.dtype)


runtime = WorkerRuntime()
