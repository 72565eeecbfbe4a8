"""Configuration: typed dataclasses (`schema`) and where their values come from
(`loading`: YAML, `OMNI_*` variables, the process-wide copy)."""

from omni_tasks.config.loading import (
    DEFAULT_CONFIG_FILE,
    config_from_dict,
    get_config,
    load_config,
    set_config,
)
from omni_tasks.config.registry import Registries
from omni_tasks.config.schema import (
    GB,
    GIB,
    PRIORITY_CLASSES,
    ARConfig,
    CacheConfig,
    CacheStrategy,
    CoreModuleConfig,
    DiffusionConfig,
    LoraConfig,
    ModelEntry,
    PoolConfig,
    SchedulerConfig,
    SchedulerType,
    SpeechConfig,
)

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "GB",
    "GIB",
    "PRIORITY_CLASSES",
    "ARConfig",
    "CacheConfig",
    "CacheStrategy",
    "CoreModuleConfig",
    "DiffusionConfig",
    "LoraConfig",
    "ModelEntry",
    "PoolConfig",
    "Registries",
    "SchedulerConfig",
    "SchedulerType",
    "SpeechConfig",
    "config_from_dict",
    "get_config",
    "load_config",
    "set_config",
]
