"""The public tasks: names, request types and stages. Each body hands its message to the
handler the worker side registered (`OmniTask.run_on_worker`).

- `generate_text` (pool `ar`): TEXT.
- `generate_chat` (pool `ar`): CHAT, a `messages` list rendered with the model's chat
  template on the worker.
- `generate_image` (pool `diffusion`): DIFFUSION, or IMAGE when `image=` is given.
- `generate_video` (pool `diffusion`): VIDEO, an MP4 (from a prompt, or a prompt and a
  first image).
- `generate_audio` (pool `diffusion`): AUDIO, a sound from a prompt (WAV, FLAC...).
- `generate_speech` (pool `speech`): SPEECH, the `input` text spoken in a `voice`.
- `generate_multimodal`: a chain `multimodal_prompt` (pool `ar`: writes the image
  prompt) -> `multimodal_render` (pool `diffusion`: renders it), same priority class;
  the returned result is the chain's last task, whose id is the request id. Sent by
  name, its message is run by an AR worker, which replaces it with that chain under
  the message's id, so the caller's id gets the final result.

A message sent by task name on `omni_tasks.app` (`app.send_task`) is accepted like
`.delay()` (`sending.send_by_name`, through `OmniCelery.send_task`). The bodies take `*args`
only to refuse them on the worker with a clear error (`workers.handlers`).
"""

from __future__ import annotations

from typing import Any

from celery import chain

from omni_tasks.requests import OmniRequest, RequestType
from omni_tasks.scheduling.policies import SchedulingPolicy
from omni_tasks.tasks.base import OmniTask
from omni_tasks.tasks.celery_app import app
from omni_tasks.tasks.router import resolve_route

#: The task id of a MULTIMODAL request's AR stage is the request id plus this.
PROMPT_STAGE_SUFFIX = ".prompt"


class ImageTask(OmniTask):
    abstract = True

    def request_type_for(self, kwargs: dict[str, Any]) -> RequestType:
        kind = kwargs.get("request_type")
        if kind in (RequestType.IMAGE.value, RequestType.IMAGE) or kwargs.get("image"):
            return RequestType.IMAGE
        return RequestType.DIFFUSION


class MultimodalTask(OmniTask):
    """`.delay()` sends the two-stage chain; this task itself never runs a stage."""

    abstract = True

    def send(self, request: OmniRequest, args: Any, task_id: str | None, options: dict) -> Any:
        return multimodal_chain(request).apply_async(**options)


class PromptTask(OmniTask):
    """The AR stage of a MULTIMODAL chain: its task id is the request id + ".prompt"."""

    abstract = True
    id_suffix = PROMPT_STAGE_SUFFIX


class RenderTask(OmniTask):
    abstract = True
    takes_previous_result = True


@app.task(bind=True, base=OmniTask, name="omni_tasks.generate_text", request_type=RequestType.TEXT)
def generate_text(self: OmniTask, *args: Any, **request: Any) -> dict[str, Any]:
    return self.run_on_worker(request, args=args)


@app.task(bind=True, base=OmniTask, name="omni_tasks.generate_chat", request_type=RequestType.CHAT)
def generate_chat(self: OmniTask, *args: Any, **request: Any) -> dict[str, Any]:
    return self.run_on_worker(request, args=args)


@app.task(bind=True, base=ImageTask, name="omni_tasks.generate_image", stage="dit")
def generate_image(self: OmniTask, *args: Any, **request: Any) -> dict[str, Any]:
    return self.run_on_worker(request, args=args)


@app.task(
    bind=True,
    base=OmniTask,
    name="omni_tasks.generate_video",
    request_type=RequestType.VIDEO,
    stage="dit",
)
def generate_video(self: OmniTask, *args: Any, **request: Any) -> dict[str, Any]:
    return self.run_on_worker(request, args=args)


@app.task(
    bind=True,
    base=OmniTask,
    name="omni_tasks.generate_audio",
    request_type=RequestType.AUDIO,
    stage="dit",
)
def generate_audio(self: OmniTask, *args: Any, **request: Any) -> dict[str, Any]:
    return self.run_on_worker(request, args=args)


@app.task(
    bind=True,
    base=OmniTask,
    name="omni_tasks.generate_speech",
    request_type=RequestType.SPEECH,
    stage="tts",
)
def generate_speech(self: OmniTask, *args: Any, **request: Any) -> dict[str, Any]:
    return self.run_on_worker(request, args=args)


@app.task(
    bind=True,
    base=MultimodalTask,
    name="omni_tasks.generate_multimodal",
    request_type=RequestType.MULTIMODAL,
)
def generate_multimodal(self: OmniTask, *args: Any, **request: Any) -> Any:
    # Reached only through `send_task` by name: its handler replaces it with the chain.
    return self.run_on_worker(request, args=args)


@app.task(
    bind=True,
    base=PromptTask,
    name="omni_tasks.multimodal_prompt",
    request_type=RequestType.MULTIMODAL,
)
def multimodal_prompt(self: OmniTask, *args: Any, **request: Any) -> dict[str, Any]:
    return self.run_on_worker(request, args=args)


@app.task(
    bind=True,
    base=RenderTask,
    name="omni_tasks.multimodal_render",
    request_type=RequestType.MULTIMODAL,
    stage="dit",
)
def multimodal_render(
    self: OmniTask, prompt_result: dict[str, Any] | None = None, *args: Any, **request: Any
) -> Any:
    return self.run_on_worker(request, prompt_result, args)


@app.task(bind=True, base=OmniTask, name="omni_tasks.probe", request_type=RequestType.TEXT)
def probe(self: OmniTask, *args: Any, **request: Any) -> dict[str, Any]:
    """A TEXT request that runs no engine: measures the queue path itself (routing,
    validation on both sides, redelivery and revocation checks, counters)."""
    return self.run_on_worker(request, args=args)


def multimodal_chain(request: OmniRequest, policy: SchedulingPolicy | None = None) -> Any:
    """The AR stage then the DiT stage; the final task's id is the request id.

    With `policy`, each stage carries its route; otherwise the router routes each
    stage when it is sent (the DiT stage from the AR worker).
    """
    message = request.to_message()
    stages = []
    prompt_id, render_id = task_ids_of(request.request_id, RequestType.MULTIMODAL)
    for task, stage, task_id in (
        (multimodal_prompt, "ar", prompt_id),
        (multimodal_render, "dit", render_id),
    ):
        options: dict[str, Any] = {"task_id": task_id}
        if policy is not None:
            route = resolve_route(request, stage, policy, task.omni_context.redis)
            options.update(queue=route.queue, priority=route.level)
        stages.append(task.signature(kwargs=message, **options))
    return chain(*stages)


def task_ids_of(request_id: str, request_type: RequestType | None = None) -> list[str]:
    """The Celery task ids a request runs as (a MULTIMODAL request has two stages;
    with no type given, both are assumed)."""
    if request_type in (None, RequestType.MULTIMODAL):
        return [request_id + PROMPT_STAGE_SUFFIX, request_id]
    return [request_id]


TASK_FOR_TYPE = {
    RequestType.TEXT: generate_text,
    RequestType.CHAT: generate_chat,
    RequestType.DIFFUSION: generate_image,
    RequestType.IMAGE: generate_image,
    RequestType.MULTIMODAL: generate_multimodal,
    RequestType.VIDEO: generate_video,
    RequestType.AUDIO: generate_audio,
    RequestType.SPEECH: generate_speech,
}
