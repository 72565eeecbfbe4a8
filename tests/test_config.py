"""Config: seed defaults, YAML, environment overrides, ConfigError naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from omni_tasks.config import (
    DEFAULT_CONFIG_FILE,
    CacheConfig,
    CacheStrategy,
    CoreModuleConfig,
    SchedulerConfig,
    SchedulerType,
    load_config,
)
from omni_tasks.errors import ConfigError


def test_seed_defaults() -> None:
    s, c, core = SchedulerConfig(), CacheConfig(), CoreModuleConfig()
    assert s.scheduler_type is SchedulerType.FIFO
    assert (s.max_queue_size, s.timeout_seconds, s.batch_size, s.enable_preemption) == (
        1000,
        300,
        32,
        True,
    )
    assert s.priority_weights == {"high": 2.0, "normal": 1.0, "low": 0.5}
    assert (c.max_memory_gb, c.strategy, c.ttl_seconds) == (8.0, CacheStrategy.LRU, 3600)
    assert (c.enable_compression, c.compression_ratio) == (True, 0.7)
    assert (core.max_memory_gb, core.max_gpu_utilization, core.max_cpu_utilization) == (
        16.0,
        0.8,
        0.9,
    )
    assert (core.request_timeout, core.worker_timeout, core.cleanup_interval) == (300, 60, 30)
    assert (core.enable_metrics, core.metrics_interval, core.enable_health_checks) == (
        True,
        10,
        True,
    )
    core.validate()


def test_embedded_default_yaml_loads() -> None:
    config = load_config(DEFAULT_CONFIG_FILE, env={})
    assert config.scheduler.scheduler_type is SchedulerType.PRIORITY
    assert config.ar.model == "tiny-llama" and config.diffusion.model == "tiny-flux"
    assert config.ar.pool_type == "threads" and config.ar.concurrency == 32


def test_gpu_yaml_loads() -> None:
    config = load_config(DEFAULT_CONFIG_FILE.parent / "gpu.yaml", env={})
    assert config.scheduler.scheduler_type is SchedulerType.HYBRID
    assert "FLUX" in config.diffusion.model and config.ar.engine == "vllm"


def test_yaml_file_named_by_omni_config(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(
        "scheduler:\n  scheduler_type: hybrid\n  max_queue_size: 7\ncache:\n"
        "  strategy: adaptive\nar:\n  engine: transformers\n"
    )
    config = load_config(env={"OMNI_CONFIG": str(file)})
    assert config.scheduler.scheduler_type is SchedulerType.HYBRID
    assert config.scheduler.max_queue_size == 7
    assert config.cache.strategy is CacheStrategy.ADAPTIVE
    assert config.ar.engine == "transformers"


def test_env_overrides_yaml(tmp_path: Path) -> None:
    env = {
        "OMNI_SCHEDULER__SCHEDULER_TYPE": "fifo",
        "OMNI_SCHEDULER__MAX_QUEUE_SIZE": "50",
        "OMNI_SCHEDULER__PRIORITY_WEIGHTS": "{high: 3, normal: 1, low: 0.3}",
        "OMNI_CACHE__ENABLE_COMPRESSION": "false",
        "OMNI_REDIS_URL": "redis://example:6380/4",
        "OMNI_AR__CONCURRENCY": "8",
        "OMNI_UNRELATED_TOOL_SETTING": "ignored",
    }
    config = load_config(DEFAULT_CONFIG_FILE, env=env)
    assert config.scheduler.scheduler_type is SchedulerType.FIFO
    assert config.scheduler.max_queue_size == 50
    assert config.scheduler.priority_weights == {"high": 3.0, "normal": 1.0, "low": 0.3}
    assert config.cache.enable_compression is False
    assert config.redis_url == "redis://example:6380/4"
    assert config.ar.concurrency == 8


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"OMNI_SCHEDULER__MAX_QUEUE_SIZE": "0"}, "scheduler.max_queue_size"),
        ({"OMNI_SCHEDULER__MAX_QUEUE_SIZE": "many"}, "scheduler.max_queue_size"),
        ({"OMNI_SCHEDULER__SCHEDULER_TYPE": "random"}, "scheduler.scheduler_type"),
        (
            {"OMNI_SCHEDULER__PRIORITY_WEIGHTS": "{high: 1, normal: 1}"},
            "scheduler.priority_weights",
        ),
        (
            {"OMNI_SCHEDULER__PRIORITY_WEIGHTS": "{high: -1, normal: 1, low: 1}"},
            "scheduler.priority_weights.high",
        ),
        ({"OMNI_SCHEDULER__TIMEOUT_SECONDS": "-5"}, "scheduler.timeout_seconds"),
        ({"OMNI_SCHEDULER__MAX_QUEU_SIZE": "5"}, "scheduler.max_queu_size"),
        ({"OMNI_CACHE__MAX_MEMORY_GB": "0"}, "cache.max_memory_gb"),
        ({"OMNI_CACHE__COMPRESSION_RATIO": "1.5"}, "cache.compression_ratio"),
        ({"OMNI_CACHE__STRATEGY": "mru"}, "cache.strategy"),
        ({"OMNI_CACHE__ENABLE_COMPRESSION": "maybe"}, "cache.enable_compression"),
        ({"OMNI_MAX_GPU_UTILIZATION": "1.2"}, "max_gpu_utilization"),
        ({"OMNI_MAX_CPU_UTILIZATION": "0"}, "max_cpu_utilization"),
        ({"OMNI_MAX_MEMORY_GB": "-1"}, "max_memory_gb"),
        ({"OMNI_REQUEST_TIMEOUT": "0"}, "request_timeout"),
        ({"OMNI_REDIS_URL": "http://x"}, "redis_url"),
        ({"OMNI_AR__ENGINE": "tgi"}, "ar.engine"),
        ({"OMNI_AR__POOL_TYPE": "gevent"}, "ar.pool_type"),
        ({"OMNI_DIFFUSION__CONCURRENCY": "0"}, "diffusion.concurrency"),
        ({"OMNI_DIFFUSION__QUEUE": "ar"}, "diffusion.queue"),
    ],
)
def test_bad_values_raise_config_error_naming_the_field(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT_CONFIG_FILE, env=env)
    assert info.value.field == field
    assert field in str(info.value)


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(env={"OMNI_CONFIG": str(tmp_path / "nope.yaml")})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad, env={})


def test_seed_validate_raises_value_error_compatible() -> None:
    config = CoreModuleConfig(max_gpu_utilization=0)
    with pytest.raises(ValueError, match="max_gpu_utilization"):
        config.validate()
