"""omni-tasks: serve autoregressive (vLLM) and diffusion (diffusers) models from
Redis-backed Celery priority queues.

The producer side: importing this package never imports torch, vLLM, diffusers or the
worker side (`workers`), and connects no worker signal. `celery -A omni_tasks worker
-Q ar|diffusion` finds the Celery app as `omni_tasks.app`, and loads the worker side.
"""

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
    BrokerUnavailableError,
    CacheError,
    ConfigError,
    CoreModuleError,
    EngineStoppedError,
    ProcessingError,
    QueueFullError,
    RequestCancelledError,
    RequestConflictError,
    RequestTimeoutError,
    RequestValidationError,
    ResourceError,
    SchedulerError,
)
from omni_tasks.requests import (
    OmniRequest,
    ProcessingStage,
    RequestType,
    create_chat_request,
    create_diffusion_request,
    create_image_request,
    create_multimodal_request,
    create_text_request,
    create_video_request,
    encode_image_file,
)
from omni_tasks.results import (
    ImageResult,
    MultimodalResult,
    PromptResult,
    TextResult,
    Usage,
    VideoResult,
)
from omni_tasks.scheduling import (
    BaseScheduler,
    CoreScheduler,
    DiffusionScheduler,
    FIFOScheduler,
    HybridScheduler,
    MultimodalScheduler,
    OmniScheduler,
    PriorityScheduler,
    create_scheduler,
)
from omni_tasks.streaming import TextDelta, stream_text
from omni_tasks.tasks import (
    app,
    generate_chat,
    generate_image,
    generate_multimodal,
    generate_text,
    generate_video,
)
from omni_tasks.tasks.batch_submit import submit_many
from omni_tasks.tasks.producer import cancel, submit

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
    "ImageResult",
    "BrokerUnavailableError",
    "MultimodalResult",
    "MultimodalScheduler",
    "OmniRequest",
    "OmniScheduler",
    "PriorityScheduler",
    "ProcessingError",
    "ProcessingStage",
    "PromptResult",
    "QueueFullError",
    "RequestCancelledError",
    "RequestConflictError",
    "RequestTimeoutError",
    "RequestType",
    "RequestValidationError",
    "ResourceError",
    "SchedulerConfig",
    "SchedulerError",
    "SchedulerType",
    "TextDelta",
    "TextResult",
    "Usage",
    "VideoResult",
    "app",
    "cancel",
    "celery",
    "create_chat_request",
    "create_diffusion_request",
    "create_image_request",
    "create_multimodal_request",
    "create_scheduler",
    "create_text_request",
    "create_video_request",
    "encode_image_file",
    "generate_chat",
    "generate_image",
    "generate_multimodal",
    "generate_text",
    "generate_video",
    "get_config",
    "load_config",
    "set_config",
    "stream_text",
    "submit",
    "submit_many",
]
