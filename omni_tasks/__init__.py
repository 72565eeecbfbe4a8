"""omni-tasks: serve autoregressive (vLLM) and diffusion (diffusers) models from
Redis-backed Celery priority queues.

Producer side only: importing this package never imports torch, vLLM or diffusers.
`celery -A omni_tasks worker -Q ar|diffusion` finds the Celery app as `omni_tasks.app`.
"""

from omni_tasks import worker_hooks as _worker_hooks  # noqa: F401  (connects signals)
from omni_tasks.celery_app import app
from omni_tasks.config import (
    CacheConfig,
    CacheStrategy,
    CoreModuleConfig,
    SchedulerConfig,
    SchedulerType,
    get_config,
    load_config,
    set_config,
)
from omni_tasks.errors import (
    CacheError,
    ConfigError,
    CoreModuleError,
    EngineStoppedError,
    ProcessingError,
    QueueFullError,
    RequestTimeoutError,
    RequestValidationError,
    ResourceError,
    SchedulerError,
)
from omni_tasks.producer import cancel, submit
from omni_tasks.requests import (
    OmniRequest,
    ProcessingStage,
    RequestType,
    create_diffusion_request,
    create_image_request,
    create_multimodal_request,
    create_text_request,
)
from omni_tasks.scheduler import CoreScheduler, OmniScheduler
from omni_tasks.schedulers import (
    BaseScheduler,
    DiffusionScheduler,
    FIFOScheduler,
    HybridScheduler,
    MultimodalScheduler,
    PriorityScheduler,
    create_scheduler,
)
from omni_tasks.tasks import generate_image, generate_multimodal, generate_text

celery = app

__all__ = [
    "BaseScheduler",
    "CacheConfig",
    "CacheError",
    "CacheStrategy",
    "ConfigError",
    "CoreModuleConfig",
    "CoreModuleError",
    "CoreScheduler",
    "DiffusionScheduler",
    "EngineStoppedError",
    "FIFOScheduler",
    "HybridScheduler",
    "MultimodalScheduler",
    "OmniRequest",
    "OmniScheduler",
    "PriorityScheduler",
    "ProcessingError",
    "ProcessingStage",
    "QueueFullError",
    "RequestTimeoutError",
    "RequestType",
    "RequestValidationError",
    "ResourceError",
    "SchedulerConfig",
    "SchedulerError",
    "SchedulerType",
    "app",
    "cancel",
    "celery",
    "create_diffusion_request",
    "create_image_request",
    "create_multimodal_request",
    "create_scheduler",
    "create_text_request",
    "generate_image",
    "generate_multimodal",
    "generate_text",
    "get_config",
    "load_config",
    "set_config",
    "submit",
]
