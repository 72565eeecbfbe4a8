"""The public API of `omni_tasks` (its `__init__`): the scheduling core (config, schedulers,
errors, requests), and every name in
`__all__`. (That importing it pulls in no engine: tests/test_architecture.py.)"""

from __future__ import annotations

import omni_tasks


def test_the_scheduling_core_is_exported() -> None:
    for name in (
        "SchedulerType",
        "CacheStrategy",
        "SchedulerConfig",
        "CacheConfig",
        "CoreModuleConfig",
        "OmniScheduler",
        "CoreScheduler",
        "BaseScheduler",
        "FIFOScheduler",
        "PriorityScheduler",
        "MultimodalScheduler",
        "DiffusionScheduler",
        "HybridScheduler",
        "CoreModuleError",
        "SchedulerError",
        "QueueFullError",
        "CacheError",
        "ResourceError",
        "ProcessingError",
        "ConfigError",
        "OmniRequest",
        "RequestType",
        "ProcessingStage",
        "create_text_request",
        "create_diffusion_request",
        "create_image_request",
        "create_multimodal_request",
    ):
        assert hasattr(omni_tasks, name), name
    assert omni_tasks.CoreScheduler is omni_tasks.OmniScheduler


def test_every_name_in_all_is_exported_once() -> None:
    names = omni_tasks.__all__
    assert len(names) == len(set(names))
    missing = [name for name in names if not hasattr(omni_tasks, name)]
    assert missing == []
    for name in ("TextResult", "ImageResult", "MultimodalResult", "PromptResult", "Usage"):
        assert name in names, name


def test_celery_finds_the_app_under_its_usual_names() -> None:
    # `celery -A omni_tasks` looks for `app` or `celery` in the package.
    assert omni_tasks.celery is omni_tasks.app
    assert omni_tasks.app.main == "omni_tasks"
