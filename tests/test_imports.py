"""The producer side installs and imports without the worker stack."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "vllm", "diffusers", "transformers", "PIL")


def test_importing_omni_tasks_imports_no_engine() -> None:
    code = (
        "import sys, omni_tasks\n"
        "from omni_tasks import generate_text, generate_image, generate_multimodal, submit\n"
        "from omni_tasks import OmniScheduler, CoreScheduler, CoreModuleConfig\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_seed_names_are_exported() -> None:
    import omni_tasks

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


def test_cli_help_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "omni_tasks.dev.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for command in ("demo", "models", "submit", "status"):
        assert command in out.stdout
