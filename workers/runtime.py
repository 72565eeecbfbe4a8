"""One worker process's state: who it is, its engines, its DiT cache and its counters.

Built once per process and shared by every task thread. The lifecycle hooks give it
its identity and its config (`attach`) and call `start` from Celery's `worker_init` (threads/solo
pools) or `worker_process_init` (prefork), so the worker reports ready only once its
models are loaded; `stop` aborts in-flight requests so a warm shutdown hands them back
promptly. Engines are also built lazily on first use (scripts, benchmarks).

The runtime is the process's context: the code of a task (`workers.execution`,
`workers.handlers`) reads the config and the Redis client from it. A runtime never
attached (a script, or a test driving it in its own process) follows the process
config, which such a caller may replace.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination import cache_directory, keys
from omni_tasks.coordination.counters import SuccessCounters
from omni_tasks.coordination.depths import waiting_above
from omni_tasks.coordination.keyspace import KeySpace
from omni_tasks.errors import EngineStoppedError
from omni_tasks.requests import Stage
from omni_tasks.tasks.context import ProducerContext
from workers.engines.base import DiffusionEngine, TextEngine
from workers.engines.chat import load_chat_template
from workers.models import TINY_MODELS, build_tiny_model
from workers.text_stream import DeltaWriter

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


@dataclass(frozen=True)
class WorkerIdentity:
    """What the Celery worker this process belongs to is: the names the Redis directory,
    the heartbeat and the worker's own queue use."""

    hostname: str
    queues: list[str] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    pool_type: str = ""
    concurrency: int = 0


class WorkerRuntime:
    """A worker process's state; one per process (`runtime`)."""

    def __init__(self, config: CoreModuleConfig | None = None) -> None:
        self.identity = WorkerIdentity(hostname=f"{socket.gethostname()}-{os.getpid()}")
        #: The config this worker serves and its Redis client (the process config's while
        #: none is attached): the same context the Celery app carries for its sends.
        self.context = ProducerContext(config)
        #: This run of the worker (a restarted worker keeps its hostname, not this).
        self.instance = uuid.uuid4().hex[:12]
        self.counters = SuccessCounters(lambda: self.redis)
        #: Writes the streamed text of this process's text requests (`text_stream`).
        self.deltas = DeltaWriter(lambda: self.redis)
        self._lock = threading.Lock()
        self._text: TextEngine | None = None
        self._diffusion: DiffusionEngine | None = None
        self._speech: Any = None
        self._dit_cache: Any = None
        self._stopped = False
        self._stop_lock = threading.Lock()
        self._stop_done = threading.Event()

    def attach(self, identity: WorkerIdentity, config: CoreModuleConfig | None = None) -> None:
        """Take the identity of the Celery worker this process serves, and its config
        (at `worker_init`)."""
        self.identity = identity
        if config is not None:
            self.context.attached = config

    @property
    def config(self) -> CoreModuleConfig:
        return self.context.config

    @property
    def keys(self) -> KeySpace:
        return self.context.keys

    @property
    def redis(self) -> redis.Redis:
        return self.context.redis

    @property
    def hostname(self) -> str:
        return self.identity.hostname

    def start(
        self, stages: list[Stage] | None = None, config: CoreModuleConfig | None = None
    ) -> None:
        """Build the engines of the given stages (default: this worker's) now."""
        for stage in self.identity.stages if stages is None else stages:
            if stage == "ar":
                self.text_engine(config)
            elif stage == "dit":
                self.diffusion_engine(config)
            elif stage == "tts":
                self.speech_engine(config)

    def text_engine(self, config: CoreModuleConfig | None = None) -> TextEngine:
        with self._lock:
            self._check_running()
            if self._text is None:
                self._text = build_text_engine(config or self.config)
            return self._text

    def diffusion_engine(self, config: CoreModuleConfig | None = None) -> DiffusionEngine:
        with self._lock:
            self._check_running()
            if self._diffusion is None:
                self._diffusion = build_diffusion_engine(config or self.config, self)
            return self._diffusion

    def speech_engine(self, config: CoreModuleConfig | None = None) -> Any:
        """The speech pool's TTS engine (`workers.engines.speech_engine`)."""
        with self._lock:
            self._check_running()
            if self._speech is None:
                self._speech = build_speech_engine(config or self.config)
            return self._speech

    @property
    def built_dit_cache(self) -> Any:
        """The DiT cache if this process has built one (None otherwise); builds nothing."""
        return self._dit_cache

    def dit_cache_bytes(self) -> int:
        """The bytes the DiT cache holds now (0 before it is built): what the diffusion
        engine's memory budget counts against its carve-out."""
        cache = self._dit_cache
        return 0 if cache is None else int(cache.stats()["bytes"])

    def dit_cache_figures(self) -> dict[str, int]:
        """The DiT cache's size for the heartbeat (zeros when this process has none)."""
        cache = self._dit_cache
        if cache is None:
            return {"dit_cache_bytes": 0, "dit_cache_entries": 0, "dit_cache_max_bytes": 0}
        stats = cache.stats()
        return {
            "dit_cache_bytes": int(stats["bytes"]),
            "dit_cache_entries": int(stats["entries"]),
            "dit_cache_max_bytes": int(stats["max_bytes"]),
        }

    def resource_status(self) -> dict[str, Any] | None:
        """The diffusion engine's device memory figures for the heartbeat (None when this
        process has no diffusion engine: a text engine sizes its own memory)."""
        resources = getattr(self._diffusion, "resources", None)
        return None if resources is None else resources.get_resource_status()

    def dit_cache(self, config: CoreModuleConfig | None = None) -> Any:
        """The worker-local DiT cache, on the diffusion engine's device, mirrored in Redis."""
        engine = self.diffusion_engine(config)
        with self._lock:
            if self._dit_cache is None:
                from workers.dit_cache import DiTCacheManager

                config = config or self.config
                listener = RedisDirectoryListener(self.redis, self.hostname, config.diffusion.queue)
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
            for engine in (self._text, self._diffusion, self._speech):
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


class RedisDirectoryListener:
    """Mirrors every insert and removal of the DiT cache into the Redis directory, with
    the worker's client."""

    def __init__(self, client: redis.Redis, worker: str, queue: str) -> None:
        self.client, self.worker, self.queue = client, worker, queue

    def on_insert(self, key: str, nbytes: int) -> None:
        cache_directory.record_insert(self.client, self.worker, self.queue, key, nbytes)

    def on_evict(self, key: str, reason: str) -> None:
        cache_directory.record_remove(self.client, self.worker, key)


def build_text_engine(config: CoreModuleConfig) -> TextEngine:
    ar = config.ar
    model = resolve_model(ar.model, config)
    log.info("loading %s text engine for %s", ar.engine, model)
    if ar.engine == "transformers":
        from workers.engines.transformers_engine import TransformersTextEngine
        from workers.lora.peft_text import PeftAdapters

        batch = min(ar.max_batch_size, config.scheduler.batch_size)
        adapters = PeftAdapters(config) if config.loras else None
        return TransformersTextEngine(
            model,
            dtype=ar.dtype,
            max_batch_size=batch,
            adapters=adapters,
            chat_template=load_chat_template(ar.chat_template),
        )
    from workers.engines.vllm_engine import VllmTextEngine
    from workers.lora.text import VllmAdapters

    return VllmTextEngine(
        model,
        dtype=ar.dtype,
        max_model_len=ar.max_model_len,
        max_num_seqs=min(ar.concurrency, config.scheduler.batch_size),
        gpu_memory_utilization=config.max_gpu_utilization,
        tensor_parallel_size=ar.tensor_parallel_size,
        kv_cache_gib=ar.kv_cache_gib,
        adapters=VllmAdapters(config, model) if config.loras else None,
        chat_template=load_chat_template(ar.chat_template),
    )


def build_speech_engine(config: CoreModuleConfig) -> Any:
    """The TTS engine of the one speech model this worker serves (`speech.model`)."""
    from workers.engines.speech_engine import SpeechEngine

    speech = config.speech
    model = resolve_model(speech.model, config)
    log.info("loading speech engine for %s", model)
    return SpeechEngine(
        model,
        device=speech.device,
        dtype=speech.dtype,
        max_batch_size=min(speech.max_batch_size, config.scheduler.batch_size),
    )


class PoolStepCounters:
    """The step loop's counts, into this worker's counters for its pool's queue."""

    def __init__(self, counters: SuccessCounters, queue: str) -> None:
        self._counters, self._queue = counters, queue

    def add_batch(self, size: int) -> None:
        self._counters.add_batch(self._queue, size)

    def add_preemptions(self, count: int) -> None:
        self._counters.add_preemptions(self._queue, count)


def build_diffusion_engine(config: CoreModuleConfig, runtime: WorkerRuntime) -> DiffusionEngine:
    """The engine of the one model `runtime` serves (`diffusion.model`), its family from
    the registry entry or the checkpoint; its memory budget counts the runtime's DiT
    cache."""
    from workers.engines.diffusers_engine import DiffusersEngine
    from workers.lora.directory import AdapterDirectoryListener

    dit = config.diffusion
    entry = config.diffusion_models()[dit.model]
    model = resolve_model(config.model_path(dit.model) or dit.model, config)
    log.info("loading diffusion engine for %s (%s)", dit.model, model)
    watched = [
        dit.queue,
        keys.model_queue(dit.queue, dit.model),
        runtime.keys.worker_queue(runtime.hostname),
    ]
    return DiffusersEngine(
        model,
        family=entry.family,
        device=dit.device,
        dtype=dit.dtype,
        max_batch_size=config.step_batch_limit,
        config=config,
        arrivals=lambda level: waiting_above(runtime.redis, config, watched, level),
        adapter_listener=AdapterDirectoryListener(
            runtime.redis, runtime.hostname, dit.queue, dit.model
        ),
        counters=PoolStepCounters(runtime.counters, dit.queue),
        cache_usage=runtime.dit_cache_bytes,
    )


runtime = WorkerRuntime()
