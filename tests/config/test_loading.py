"""Config loading: the embedded YAML files, `OMNI_CONFIG`, `OMNI_*` overrides, values
coerced to the field types (a bad value is a ConfigError naming the field), and the
process-wide copy."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from omni_tasks.config import (
    DEFAULT_CONFIG_FILE,
    CacheStrategy,
    CoreModuleConfig,
    SchedulerType,
    config_from_dict,
    get_config,
    load_config,
    set_config,
)
from omni_tasks.errors import ConfigError


def test_embedded_default_yaml_loads() -> None:
    config = load_config(DEFAULT_CONFIG_FILE, env={})
    assert config.scheduler.scheduler_type is SchedulerType.PRIORITY
    assert config.ar.model == "tiny-llama" and config.diffusion.model == "tiny-flux"
    assert config.ar.pool_type == "threads" and config.ar.concurrency == 32


def test_no_file_named_loads_the_embedded_default() -> None:
    assert load_config(env={}) == load_config(DEFAULT_CONFIG_FILE, env={})


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


def test_env_values_are_coerced_to_the_field_types() -> None:
    env = {
        "OMNI_CACHE__TTL_SECONDS": "7.0",  # an integral float string is an int
        "OMNI_CACHE__COMPRESSION_RATIO": "0.5",
        "OMNI_ENABLE_METRICS": "off",
        "OMNI_DIFFUSION__STEP_CACHE_PARAMS": "{threshold: 0.2}",
        "OMNI_DIFFUSION__CACHE_AFFINITY": "no",
    }
    config = load_config(DEFAULT_CONFIG_FILE, env=env)
    assert config.cache.ttl_seconds == 7 and isinstance(config.cache.ttl_seconds, int)
    assert config.cache.compression_ratio == 0.5
    assert config.enable_metrics is False
    assert config.diffusion.step_cache_params == {"threshold": 0.2}
    assert config.diffusion.cache_affinity is False


# Values the loader cannot turn into the field's type, and names that match no field.
# (Values of the right type that `validate()` refuses: tests/config/test_schema.py.)
@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"OMNI_SCHEDULER__MAX_QUEUE_SIZE": "many"}, "scheduler.max_queue_size"),
        ({"OMNI_SCHEDULER__SCHEDULER_TYPE": "random"}, "scheduler.scheduler_type"),
        ({"OMNI_SCHEDULER__MAX_QUEU_SIZE": "5"}, "scheduler.max_queu_size"),
        ({"OMNI_CACHE__STRATEGY": "mru"}, "cache.strategy"),
        ({"OMNI_CACHE__TTL_SECONDS": "7.5"}, "cache.ttl_seconds"),  # not truncated to 7
        ({"OMNI_CACHE__ENABLE_COMPRESSION": "maybe"}, "cache.enable_compression"),
        ({"OMNI_SCHEDULER__PRIORITY_WEIGHTS": "[1, 2]"}, "scheduler.priority_weights"),
        ({"OMNI_AR": "threads"}, "ar"),
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
    broken = tmp_path / "broken.yaml"
    broken.write_text("scheduler: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(broken, env={})
    assert info.value.field == "OMNI_CONFIG"


def test_config_from_dict_builds_and_validates() -> None:
    config = config_from_dict({"key_prefix": "other", "diffusion": {"queue": "dit"}})
    assert isinstance(config, CoreModuleConfig)
    assert (config.key_prefix, config.diffusion.queue, config.ar.queue) == ("other", "dit", "ar")
    with pytest.raises(ConfigError) as info:
        config_from_dict({"diffusion": {"queue": "ar"}})
    assert info.value.field == "diffusion.queue"


def test_set_config_validates_and_replaces_the_process_config(use_config) -> None:
    original = get_config()
    assert get_config() is original  # loaded once, then the same object
    changed = replace(original, key_prefix="elsewhere")
    use_config(changed)
    assert get_config() is changed
    broken = replace(original, request_timeout=0)
    with pytest.raises(ConfigError) as info:
        set_config(broken)
    assert info.value.field == "request_timeout"
    assert get_config() is changed  # a refused config does not replace the current one


def test_broker_url_from_env_and_empty_means_redis() -> None:
    rabbit = load_config(env={"OMNI_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"})
    assert rabbit.broker_url == "amqp://guest:guest@127.0.0.1:5672//"
    for empty in ("", "null"):
        assert load_config(env={"OMNI_BROKER_URL": empty}).broker_url is None
    assert load_config(env={}).broker_url is None  # the embedded default: null


def test_the_renamed_memory_keys_are_read_under_their_old_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`*_gb` became `*_gib` (the same GiB): YAML, `OMNI_*` variables and mappings with
    the old names still load, and a warning names the new key."""
    old = tmp_path / "old.yaml"
    old.write_text("max_memory_gb: 3\ncache: {max_memory_gb: 0.25}\nlora: {memory_gb: 0.1}\n")
    with caplog.at_level("WARNING", logger="omni_tasks.config.loading"):
        config = load_config(old, env={})
    assert (config.max_memory_gib, config.cache.max_memory_gib, config.lora.memory_gib) == (
        3.0,
        0.25,
        0.1,
    )
    assert "cache.max_memory_gb is deprecated, use cache.max_memory_gib" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="omni_tasks.config.loading"):
        config = load_config(DEFAULT_CONFIG_FILE, env={"OMNI_CACHE__MAX_MEMORY_GB": "0.5"})
    assert config.cache.max_memory_gib == 0.5  # the variable still beats the file
    assert "use OMNI_CACHE__MAX_MEMORY_GIB" in caplog.text
    both = config_from_dict({"lora": {"memory_gb": 1, "memory_gib": 2}, "max_memory_gb": 5})
    assert (both.lora.memory_gib, both.max_memory_gib) == (2.0, 5.0)  # the new name wins
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT_CONFIG_FILE, env={"OMNI_MAX_MEMORY_GB": "0"})
    assert err.value.field == "max_memory_gib"
