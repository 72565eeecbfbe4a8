"""Config schema: the defaults, `validate()` naming the dotted field of the first bad
value, and what the deployment fields derive (the pool of a stage, a worker's stages)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from omni_tasks.config import (
    DEFAULT_CONFIG_FILE,
    ARConfig,
    CacheConfig,
    CacheStrategy,
    CoreModuleConfig,
    DiffusionConfig,
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
    assert (c.max_memory_gib, c.strategy, c.ttl_seconds) == (8.0, CacheStrategy.LRU, 3600)
    assert (c.enable_compression, c.compression_ratio) == (True, 0.7)
    assert (core.max_memory_gib, core.max_gpu_utilization, core.max_cpu_utilization) == (
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


# Values of the right type that `validate()` refuses, set through the loader's env
# overrides (values it cannot coerce: tests/config/test_loading.py).
@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"OMNI_SCHEDULER__MAX_QUEUE_SIZE": "0"}, "scheduler.max_queue_size"),
        (
            {"OMNI_SCHEDULER__PRIORITY_WEIGHTS": "{high: 1, normal: 1}"},
            "scheduler.priority_weights",
        ),
        (
            {"OMNI_SCHEDULER__PRIORITY_WEIGHTS": "{high: -1, normal: 1, low: 1}"},
            "scheduler.priority_weights.high",
        ),
        ({"OMNI_SCHEDULER__TIMEOUT_SECONDS": "-5"}, "scheduler.timeout_seconds"),
        ({"OMNI_CACHE__MAX_MEMORY_GIB": "0"}, "cache.max_memory_gib"),
        ({"OMNI_CACHE__COMPRESSION_RATIO": "1.5"}, "cache.compression_ratio"),
        ({"OMNI_MAX_GPU_UTILIZATION": "1.2"}, "max_gpu_utilization"),
        ({"OMNI_MAX_CPU_UTILIZATION": "0"}, "max_cpu_utilization"),
        ({"OMNI_MAX_MEMORY_GIB": "-1"}, "max_memory_gib"),
        ({"OMNI_REQUEST_TIMEOUT": "0"}, "request_timeout"),
        ({"OMNI_REDIS_URL": "http://x"}, "redis_url"),
        ({"OMNI_BROKER_URL": "kafka://x:9092"}, "broker_url"),
        ({"OMNI_AR__ENGINE": "tgi"}, "ar.engine"),
        ({"OMNI_AR__POOL_TYPE": "gevent"}, "ar.pool_type"),
        ({"OMNI_DIFFUSION__CONCURRENCY": "0"}, "diffusion.concurrency"),
        ({"OMNI_DIFFUSION__QUEUE": "ar"}, "diffusion.queue"),
        ({"OMNI_AR__QUEUE": "text:pool"}, "ar.queue"),
        ({"OMNI_KEY_PREFIX": "omni:test"}, "key_prefix"),
    ],
)
def test_bad_values_raise_config_error_naming_the_field(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT_CONFIG_FILE, env=env)
    assert info.value.field == field
    assert field in str(info.value)


def test_seed_validate_raises_value_error_compatible() -> None:
    config = CoreModuleConfig(max_gpu_utilization=0)
    with pytest.raises(ValueError, match="max_gpu_utilization"):
        config.validate()


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (CoreModuleConfig(ar=ARConfig(queue="text:pool")), "ar.queue"),
        (CoreModuleConfig(ar=ARConfig(queue="")), "ar.queue"),
        (CoreModuleConfig(diffusion=DiffusionConfig(queue="dit:1")), "diffusion.queue"),
        (CoreModuleConfig(key_prefix="omni:prod"), "key_prefix"),
        (CoreModuleConfig(key_prefix=""), "key_prefix"),
        (CoreModuleConfig(scheduler=SchedulerConfig(batch_size=0)), "scheduler.batch_size"),
        (CoreModuleConfig(cache=CacheConfig(ttl_seconds=0)), "cache.ttl_seconds"),
        (CoreModuleConfig(max_redeliveries=-1), "max_redeliveries"),
        (CoreModuleConfig(diffusion=DiffusionConfig(step_cache="warp")), "diffusion.step_cache"),
        (CoreModuleConfig(ar=ARConfig(prefetch_multiplier=0)), "ar.prefetch_multiplier"),
    ],
)
def test_validate_names_the_field(config: CoreModuleConfig, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_colon_is_refused_in_names_kombu_joins_with_it() -> None:
    """Queue names and the key prefix must not contain ':', kombu's separator."""
    with pytest.raises(ConfigError, match="must not contain ':'") as info:
        CoreModuleConfig(diffusion=DiffusionConfig(queue="a:b")).validate()
    assert info.value.field == "diffusion.queue"
    with pytest.raises(ConfigError, match="':'") as info:
        CoreModuleConfig(key_prefix="a:b").validate()
    assert info.value.field == "key_prefix"
    CoreModuleConfig(key_prefix="a.b", ar=ARConfig(queue="text-pool.v2")).validate()


@pytest.mark.parametrize("pool_type", ["threads", "solo", "prefork"])
def test_pool_types_celery_runs_are_accepted(pool_type: str) -> None:
    config = CoreModuleConfig(
        ar=ARConfig(pool_type=pool_type), diffusion=DiffusionConfig(pool_type=pool_type)
    )
    config.validate()


@pytest.mark.parametrize("pool_type", ["gevent", "eventlet", "Threads", ""])
def test_other_pool_types_are_refused(pool_type: str) -> None:
    with pytest.raises(ConfigError, match="threads, solo or prefork") as info:
        CoreModuleConfig(diffusion=DiffusionConfig(pool_type=pool_type)).validate()
    assert info.value.field == "diffusion.pool_type"
    with pytest.raises(ConfigError) as info:
        CoreModuleConfig(ar=ARConfig(pool_type=pool_type)).validate()
    assert info.value.field == "ar.pool_type"


def test_pool_for_a_stage() -> None:
    config = CoreModuleConfig(ar=ARConfig(queue="text"), diffusion=DiffusionConfig(queue="dit"))
    assert config.pool_for("ar") is config.ar
    assert config.pool_for("dit") is config.diffusion
    assert config.pool_for("ar").queue == "text" and config.pool_for("dit").queue == "dit"


def test_stages_for_the_queues_a_worker_consumes() -> None:
    config = CoreModuleConfig(ar=ARConfig(queue="text"), diffusion=DiffusionConfig(queue="dit"))
    assert config.stages_for(["text"]) == ["ar"]
    assert config.stages_for(["dit"]) == ["dit"]
    assert config.stages_for(["dit", "text"]) == ["ar", "dit"]  # pipeline order
    assert config.stages_for(["dit", "omni.w.worker-1", "elsewhere"]) == ["dit"]
    assert config.stages_for([]) == []
    assert config.stages_for(["ar", "diffusion"]) == []  # the default names are not these


def test_longest_task_bounds_both_timeouts() -> None:
    config = CoreModuleConfig(request_timeout=120)
    assert config.longest_task_s == 300  # scheduler.timeout_seconds
    longer = replace(config, request_timeout=900)
    assert longer.longest_task_s == 900


def test_class_rank_orders_classes_by_weight() -> None:
    from omni_tasks.config import SchedulerConfig

    default = SchedulerConfig()
    assert [default.class_rank(c) for c in ("high", "normal", "low")] == [0, 1, 2]
    upside_down = SchedulerConfig(priority_weights={"high": 0.5, "normal": 1.0, "low": 2.0})
    assert [upside_down.class_rank(c) for c in ("high", "normal", "low")] == [2, 1, 0]


def test_the_broker_is_redis_unless_broker_url_names_another() -> None:
    core = CoreModuleConfig()
    assert core.broker_url is None
    assert core.broker == core.redis_url and core.broker_is_redis
    rabbit = replace(core, broker_url="amqp://u:p@rabbit:5672//")
    rabbit.validate()
    assert rabbit.broker == "amqp://u:p@rabbit:5672//" and not rabbit.broker_is_redis
    assert rabbit.redis_url == core.redis_url  # results and coordination stay in Redis
    tls = replace(core, broker_url="rediss://:p@other:6380/0")
    tls.validate()
    assert tls.broker_is_redis


def test_a_bad_broker_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as info:
        replace(CoreModuleConfig(), broker_url="http://u:secret@x").validate()
    assert info.value.field == "broker_url" and "secret" not in str(info.value)
