"""The configuration dataclasses: scheduler, DiT cache, the core module's limits, and
what a distributed deployment adds (Redis, the HTTP API, and the pools, whose sections
are in `config.pools`). `validate()` raises `ConfigError` naming the dotted field of the
first bad value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from omni_tasks.config.pools import DEFAULT_MODEL_FIELDS as DEFAULT_MODEL_FIELDS
from omni_tasks.config.pools import LORA_RANKS as LORA_RANKS
from omni_tasks.config.pools import TINY_VOICES as TINY_VOICES
from omni_tasks.config.pools import ARConfig as ARConfig
from omni_tasks.config.pools import DiffusionConfig as DiffusionConfig
from omni_tasks.config.pools import LoraConfig as LoraConfig
from omni_tasks.config.pools import PoolConfig as PoolConfig
from omni_tasks.config.pools import SpeechConfig as SpeechConfig
from omni_tasks.config.pools import require
from omni_tasks.config.registry import ModelEntry, validate_registry
from omni_tasks.vocabulary import (
    GIB,
    PRIORITY_CLASSES,
    STAGES,
    Stage,
    valid_adapter_name,
)

SENTINEL_SCHEME = "sentinel://"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+socket://", SENTINEL_SCHEME)
BROKER_SCHEMES = ("amqp://", "amqps://", "pyamqp://", *REDIS_SCHEMES)
#: The unit of every memory setting and figure (`*_gib`); `GB` is the same number.
GB = GIB


class SchedulerType(Enum):
    """How requests are ordered: at the producer (queue + level) and in workers."""

    FIFO = "fifo"
    PRIORITY = "priority"
    MULTIMODAL = "multimodal"
    DIFFUSION = "diffusion"
    HYBRID = "hybrid"


class CacheStrategy(Enum):
    """Eviction policy of the worker-local DiT cache."""

    LRU = "lru"
    LFU = "lfu"
    TTL = "ttl"
    ADAPTIVE = "adaptive"


@dataclass
class SchedulerConfig:
    scheduler_type: SchedulerType = SchedulerType.FIFO
    max_queue_size: int = 1000
    priority_weights: dict[str, float] = field(
        default_factory=lambda: {"high": 2.0, "normal": 1.0, "low": 0.5}
    )
    timeout_seconds: int = 300
    batch_size: int = 32
    enable_preemption: bool = True
    # A request a diffusion worker has held this long ranks above every request it has
    # held for less (oldest first): it is neither passed nor paused by later arrivals.
    starvation_s: float = 30.0

    def class_rank(self, priority_class: str) -> int:
        """0 for the heaviest class, then 1, 2: the order engines serve classes in."""
        ranked = sorted(PRIORITY_CLASSES, key=lambda c: -self.priority_weights[c])
        return ranked.index(priority_class)

    def validate(self) -> None:
        require(self.max_queue_size > 0, "scheduler.max_queue_size", "must be positive")
        require(self.timeout_seconds > 0, "scheduler.timeout_seconds", "must be positive")
        require(self.batch_size > 0, "scheduler.batch_size", "must be positive")
        require(self.starvation_s > 0, "scheduler.starvation_s", "must be positive")
        missing = [c for c in PRIORITY_CLASSES if c not in self.priority_weights]
        require(not missing, "scheduler.priority_weights", f"missing classes {missing}")
        for name, weight in self.priority_weights.items():
            require(
                name in PRIORITY_CLASSES,
                f"scheduler.priority_weights.{name}",
                f"unknown class; use {PRIORITY_CLASSES}",
            )
            require(weight > 0, f"scheduler.priority_weights.{name}", "must be positive")


@dataclass
class CacheConfig:
    max_memory_gib: float = 8.0
    strategy: CacheStrategy = CacheStrategy.LRU
    ttl_seconds: int = 3600
    enable_compression: bool = True
    compression_ratio: float = 0.7

    def validate(self) -> None:
        require(self.max_memory_gib > 0, "cache.max_memory_gib", "must be positive")
        require(self.ttl_seconds > 0, "cache.ttl_seconds", "must be positive")
        require(0 < self.compression_ratio <= 1, "cache.compression_ratio", "must be in (0, 1]")


@dataclass
class APIConfig:
    """The HTTP API (`omni-tasks api`): a stateless front end, any number per Redis."""

    # Bearer token every request must carry; empty: no authentication (loopback use).
    # The OMNI_API_TOKEN variable sets it too.
    token: str | None = None
    # Bodies above this are refused with 413 (an edit's image travels in the body).
    max_body_mb: float = 32.0
    # The HMAC-SHA256 key of webhook signatures; webhooks are refused without one.
    webhook_secret: str | None = None
    # Delivery attempts of one webhook before it is given up (backoff between them).
    webhook_max_attempts: int = 8
    webhook_timeout_s: float = 10.0
    # How long the OpenAI endpoints wait for a result before 504 (and cancelling it).
    wait_timeout_s: float = 300.0
    # The Retry-After of a 429 (the pool's queue is full).
    retry_after_s: int = 2
    # Image URLs start with this (e.g. https://api.example.com); empty: the URL the
    # request came to.
    public_url: str | None = None
    # Where the operations page links to Flower and Grafana; empty: no link.
    flower_url: str | None = None
    grafana_url: str | None = None

    def validate(self) -> None:
        require(self.max_body_mb > 0, "api.max_body_mb", "must be positive")
        require(self.webhook_max_attempts > 0, "api.webhook_max_attempts", "must be positive")
        require(self.webhook_timeout_s > 0, "api.webhook_timeout_s", "must be positive")
        require(self.wait_timeout_s > 0, "api.wait_timeout_s", "must be positive")
        require(self.retry_after_s > 0, "api.retry_after_s", "must be positive")
        for name in ("public_url", "flower_url", "grafana_url"):
            url = getattr(self, name)
            require(
                not url or url.startswith(("http://", "https://")),
                f"api.{name}",
                "must be an http:// or https:// URL",
            )


@dataclass
class CoreModuleConfig:
    """The whole configuration: the core module's fields first, then deployment fields."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    max_memory_gib: float = 16.0
    max_gpu_utilization: float = 0.8
    max_cpu_utilization: float = 0.9
    request_timeout: int = 300
    worker_timeout: int = 60
    cleanup_interval: int = 30
    enable_metrics: bool = True
    metrics_interval: int = 10
    enable_health_checks: bool = True
    # Deployment.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The Celery broker when it is not Redis (amqp:// for RabbitMQ); None: `redis_url`.
    # Results and coordination stay in Redis either way.
    broker_url: str | None = None
    #: The Sentinel master name, where `redis_url` / `broker_url` name Sentinels
    #: (`sentinel://host:26379;sentinel://host:26380/0`, as kombu spells them).
    redis_sentinel_master: str = "mymaster"
    key_prefix: str = "omni"
    models_dir: str = "~/.cache/omni-tasks/models"
    output_dir: str = "~/.cache/omni-tasks/outputs"
    max_redeliveries: int = 3
    result_expires: int = 86400
    #: How often live workers look for a dead worker's messages and for lost requests.
    reaper_interval_s: float = 10.0
    #: How long an accepted request may be nowhere (not queued, held or done) before it
    #: is published again.
    ledger_grace_s: float = 30.0
    #: A running request's progress (Celery state PROGRESS): its first write after this
    #: long (a shorter request writes none: its result follows), then at most one per
    #: `progress_interval_s`.
    progress_first_after_s: float = 1.0
    progress_interval_s: float = 0.5
    ar: ARConfig = field(default_factory=ARConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    #: LoRA adapters requests may name: name -> a local folder in the PEFT / diffusers
    #: format (relative paths are under `models_dir`). Messages carry names only.
    loras: dict[str, str] = field(default_factory=dict)
    lora: LoraConfig = field(default_factory=LoraConfig)
    #: The diffusion models requests may name (`model=`): name -> where it loads from.
    #: Each diffusion worker serves one (`diffusion.model`, always registered); a
    #: request goes to its model's queue (`keys.model_queue`).
    models: dict[str, ModelEntry] = field(default_factory=dict)
    api: APIConfig = field(default_factory=APIConfig)

    def validate(self) -> None:
        self.scheduler.validate()
        self.cache.validate()
        require(self.max_memory_gib > 0, "max_memory_gib", "must be positive")
        require(0 < self.max_gpu_utilization <= 1, "max_gpu_utilization", "must be in (0, 1]")
        require(0 < self.max_cpu_utilization <= 1, "max_cpu_utilization", "must be in (0, 1]")
        require(self.request_timeout > 0, "request_timeout", "must be positive")
        require(self.worker_timeout > 0, "worker_timeout", "must be positive")
        require(self.cleanup_interval > 0, "cleanup_interval", "must be positive")
        require(self.metrics_interval > 0, "metrics_interval", "must be positive")
        require(
            self.redis_url.startswith(REDIS_SCHEMES),
            "redis_url",
            "must be a redis://, rediss://, unix:// or sentinel:// URL",
        )
        require(
            self.broker_url is None or self.broker_url.startswith(BROKER_SCHEMES),
            "broker_url",
            f"must be empty (use redis_url) or a URL starting with one of {BROKER_SCHEMES}",
        )
        for name, url in (("redis_url", self.redis_url), ("broker_url", self.broker_url)):
            require(sentinel_url_problem(url) is None, name, sentinel_url_problem(url) or "")
        require(
            bool(self.redis_sentinel_master.strip()),
            "redis_sentinel_master",
            "must name the Sentinel master (default mymaster)",
        )
        require(bool(self.key_prefix), "key_prefix", "must not be empty")
        require(":" not in self.key_prefix, "key_prefix", "must not contain ':' (it names queues)")
        require(self.max_redeliveries >= 0, "max_redeliveries", "must be >= 0")
        require(self.result_expires > 0, "result_expires", "must be positive")
        require(self.reaper_interval_s > 0, "reaper_interval_s", "must be positive")
        require(self.ledger_grace_s > 0, "ledger_grace_s", "must be positive")
        require(self.progress_first_after_s >= 0, "progress_first_after_s", "must be >= 0")
        require(self.progress_interval_s > 0, "progress_interval_s", "must be positive")
        self.ar.validate("ar")
        self.diffusion.validate("diffusion")
        self.speech.validate("speech")
        self.lora.validate()
        for name, path in self.loras.items():
            require(valid_adapter_name(name), f"loras.{name}", "is not a valid adapter name")
            require(bool(str(path).strip()), f"loras.{name}", "needs a folder")
        dit = self.diffusion
        validate_registry(self.models, *(getattr(dit, f) for f in DEFAULT_MODEL_FIELDS))
        self.api.validate()
        require(self.ar.queue != self.diffusion.queue, "diffusion.queue", "must differ from ar")
        require(
            self.speech.queue not in (self.ar.queue, self.diffusion.queue),
            "speech.queue",
            "must differ from ar and diffusion",
        )

    @property
    def broker(self) -> str:
        """The Celery broker's URL: `broker_url`, else `redis_url`."""
        return self.broker_url or self.redis_url

    @property
    def broker_is_redis(self) -> bool:
        """Whether the queues are Redis lists (which omni-tasks may read directly)."""
        return self.broker.startswith(REDIS_SCHEMES)

    @property
    def longest_task_s(self) -> int:
        """Upper bound of any task's run time; the broker's visibility timeout exceeds it."""
        return max(self.request_timeout, self.scheduler.timeout_seconds)

    @property
    def request_time_cap_s(self) -> int:
        """The most time any one request gets, from its creation, whatever its `timeout_s`."""
        return min(self.request_timeout, self.scheduler.timeout_seconds)

    @property
    def step_batch_limit(self) -> int:
        """The most requests one denoising step of a diffusion worker runs together."""
        return min(self.scheduler.batch_size, self.diffusion.max_batch_size)

    def pools(self) -> dict[Stage, PoolConfig]:
        """Every pool, by the stage it runs: "ar", "dit" (diffusion), "tts" (speech)."""
        return {"ar": self.ar, "dit": self.diffusion, "tts": self.speech}

    def pool_for(self, stage: Stage) -> PoolConfig:
        """The pool that runs a pipeline stage (`pools`)."""
        return self.pools()[stage]

    def pools_by_name(self) -> dict[str, PoolConfig]:
        """Every pool by its config section's name: "ar", "diffusion", "speech"."""
        return {"ar": self.ar, "diffusion": self.diffusion, "speech": self.speech}

    def pool_queues(self) -> list[str]:
        """The pools' queues, in pipeline order (ar, diffusion, speech)."""
        return [pool.queue for pool in self.pools().values()]

    def stages_for(self, queues: list[str]) -> list[Stage]:
        """The pipeline stages a worker consuming `queues` runs, in pipeline order."""
        return [stage for stage in STAGES if self.pool_for(stage).queue in queues]

    def diffusion_models(self) -> dict[str, ModelEntry]:
        """Every diffusion model a request may name: the registry, plus the diffusion
        pool's defaults `diffusion.model`, `video_model`, `video_image_model` and
        `audio_model` (each its registry entry if listed, else a bare one)."""
        found = dict(self.models)
        for part in DEFAULT_MODEL_FIELDS:
            found.setdefault(getattr(self.diffusion, part), ModelEntry())
        return found

    def model_path(self, name: str) -> str | None:
        """The registry `path` of model `name` (None if it has none): `~` expanded; a
        relative path is taken under `models_dir` when that exists there, else kept
        as it is (a hub id such as `Qwen/Qwen-Image`)."""
        entry = self.models.get(name)
        if entry is None or not entry.path:
            return None
        path = Path(os.path.expanduser(entry.path))
        under = self.models_path() / path
        return str(under) if not path.is_absolute() and under.exists() else str(path)

    def models_path(self) -> Path:
        return Path(os.path.expanduser(self.models_dir))

    def output_path(self) -> Path:
        return Path(os.path.expanduser(self.output_dir))


def is_sentinel_url(url: str | None) -> bool:
    """Whether `url` names Redis Sentinels rather than one Redis server."""
    return bool(url) and str(url).startswith(SENTINEL_SCHEME)


def sentinel_url_problem(url: str | None) -> str | None:
    """Why a `sentinel://` URL is unusable (every `;`-separated part must be
    `sentinel://[user:password@]host[:port][/db]`, port 26379 by default), or None
    (also for other URLs)."""
    if not is_sentinel_url(url):
        return None
    for part in str(url).split(";"):
        if not part.startswith(SENTINEL_SCHEME):
            return f"every ';'-separated part must start with sentinel:// (got {part!r})"
        hostport = part[len(SENTINEL_SCHEME) :].split("/", 1)[0].rsplit("@", 1)[-1]
        host, colon, port = hostport.partition(":")
        if not host or (colon and not port.isdigit()):
            return f"each Sentinel needs a host and an optional numeric port (got {part!r})"
    return None
