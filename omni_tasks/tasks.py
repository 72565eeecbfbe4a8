"""The public tasks. Bodies run in the worker pools and import the engines lazily, so
the producer never imports torch.

- `generate_text` (pool `ar`): TEXT.
- `generate_image` (pool `diffusion`): DIFFUSION, or IMAGE when `image=` is given.
- `generate_multimodal`: a chain `multimodal_prompt` (pool `ar`: writes the image
  prompt) -> `multimodal_render` (pool `diffusion`: renders it), same priority class;
  the returned result is the chain's last task, whose id is the request id.
"""

from __future__ import annotations

from typing import Any

from celery import chain

from omni_tasks.celery_app import app
from omni_tasks.policies import SchedulingPolicy
from omni_tasks.requests import OmniRequest, RequestType
from omni_tasks.routing import resolve_route
from omni_tasks.task_base import OmniTask


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

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        **options: Any,
    ) -> Any:
        request = self.build_request(kwargs or {})
        if task_id:
            request.request_id = task_id
        return multimodal_chain(request).apply_async(**options)


class RenderTask(OmniTask):
    abstract = True
    takes_previous_result = True


@app.task(bind=True, base=OmniTask, name="omni_tasks.generate_text", request_type=RequestType.TEXT)
def generate_text(self: OmniTask, **request: Any) -> dict[str, Any]:
    from workers.execution import run_text

    return self.execute(request, run_text)


@app.task(bind=True, base=ImageTask, name="omni_tasks.generate_image", stage="dit")
def generate_image(self: OmniTask, **request: Any) -> dict[str, Any]:
    from workers.execution import run_image

    return self.execute(request, run_image)


@app.task(
    bind=True,
    base=MultimodalTask,
    name="omni_tasks.generate_multimodal",
    request_type=RequestType.MULTIMODAL,
)
def generate_multimodal(self: OmniTask, **request: Any) -> Any:
    # Reached only through `send_task` by name: become the two-stage chain.
    raise self.replace(multimodal_chain(self.build_request(request)))


@app.task(
    bind=True,
    base=OmniTask,
    name="omni_tasks.multimodal_prompt",
    request_type=RequestType.MULTIMODAL,
)
def multimodal_prompt(self: OmniTask, **request: Any) -> dict[str, Any]:
    from workers.execution import run_multimodal_prompt

    return self.execute(request, run_multimodal_prompt)


@app.task(
    bind=True,
    base=RenderTask,
    name="omni_tasks.multimodal_render",
    request_type=RequestType.MULTIMODAL,
    stage="dit",
)
def multimodal_render(self: OmniTask, prompt_result: dict[str, Any], **request: Any) -> Any:
    from workers.execution import run_multimodal_render

    return self.execute(request, lambda req: run_multimodal_render(req, prompt_result))


@app.task(bind=True, base=OmniTask, name="omni_tasks.probe", request_type=RequestType.TEXT)
def probe(self: OmniTask, **request: Any) -> dict[str, Any]:
    """A TEXT request that runs no engine: measures the queue path itself (routing,
    validation on both sides, redelivery and revocation checks, counters)."""
    return self.execute(request, lambda req: {"request_id": req.request_id, "text": ""})


def multimodal_chain(request: OmniRequest, policy: SchedulingPolicy | None = None) -> Any:
    """The AR stage then the DiT stage; the final task's id is the request id.

    With `policy`, each stage carries its route; otherwise the router routes each
    stage when it is sent (the DiT stage from the AR worker).
    """
    message = request.to_message()
    stages = []
    for task, stage, task_id in (
        (multimodal_prompt, "ar", f"{request.request_id}.prompt"),
        (multimodal_render, "dit", request.request_id),
    ):
        options: dict[str, Any] = {"task_id": task_id}
        if policy is not None:
            route = resolve_route(request, stage, policy)
            options.update(queue=route.queue, priority=route.priority)
        stages.append(task.signature(kwargs=message, **options))
    return chain(*stages)


TASK_FOR_TYPE = {
    RequestType.TEXT: generate_text,
    RequestType.DIFFUSION: generate_image,
    RequestType.IMAGE: generate_image,
    RequestType.MULTIMODAL: generate_multimodal,
}
