"""How a request becomes a Celery task: the app and its settings, the router (queue and
priority), the task class and the public tasks, and submit/cancel."""

from omni_tasks.tasks.celery_app import app
from omni_tasks.tasks.definitions import (
    TASK_FOR_TYPE,
    generate_audio,
    generate_chat,
    generate_image,
    generate_multimodal,
    generate_speech,
    generate_text,
    generate_video,
    multimodal_chain,
    multimodal_prompt,
    multimodal_render,
    probe,
    task_ids_of,
)

__all__ = [
    "TASK_FOR_TYPE",
    "app",
    "generate_audio",
    "generate_chat",
    "generate_image",
    "generate_multimodal",
    "generate_speech",
    "generate_text",
    "generate_video",
    "multimodal_chain",
    "multimodal_prompt",
    "multimodal_render",
    "probe",
    "task_ids_of",
]
