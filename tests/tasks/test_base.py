"""`OmniTask`, the producer half of the task contract: kwargs are validated into a request
before anything is sent, the request id is the task id, and the body runs the handler
the worker side registered (none in an application process)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from helpers import DIT_QUEUE, message_kwargs, queued_messages, where
from redis import Redis

from omni_tasks import (
    ProcessingError,
    RequestType,
    RequestValidationError,
    create_multimodal_request,
    generate_image,
    generate_multimodal,
    generate_text,
    get_config,
)
from omni_tasks.config import ARConfig, DiffusionConfig
from omni_tasks.tasks import multimodal_prompt, multimodal_render, probe
from omni_tasks.tasks.base import OmniTask
from omni_tasks.tasks.sending import KWARGSREPR_MAX_CHARS, request_deadline

TASKS = [generate_text, generate_image, generate_multimodal, multimodal_prompt, probe]


def snapshot(client: Redis) -> dict[str, object]:
    return {k: client.type(k) for k in client.scan_iter(count=1000)}


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_invalid_kwargs_raise_before_anything_is_sent(redis_client, task: OmniTask) -> None:
    before = snapshot(redis_client)
    with pytest.raises(RequestValidationError) as info:
        task.apply_async(kwargs={"prompt": "x", "steps": 0, "max_tokens": 0})
    assert info.value.field in ("steps", "max_tokens")
    with pytest.raises(RequestValidationError) as info:
        task.apply_async(kwargs=["prompt", "x"])  # type: ignore[arg-type]
    assert info.value.field == "kwargs"
    with pytest.raises(RequestValidationError) as info:
        task.delay(prompt="x", unknown_field=1)
    assert info.value.field == "unknown_field"
    assert snapshot(redis_client) == before


def test_a_timeout_becomes_the_messages_expiry(redis_client, use_config) -> None:
    from datetime import datetime

    generate_text.delay(prompt="soon", timeout_s=30)
    generate_text.delay(prompt="whenever")
    (_, timed), (_, untimed) = sorted(
        queued_messages(redis_client, "ar"), key=lambda m: message_kwargs(m[1])["prompt"]
    )
    kwargs = message_kwargs(timed)
    expires = datetime.fromisoformat(timed["headers"]["expires"]).timestamp()
    assert expires == pytest.approx(kwargs["created_at"] + 30, abs=1e-3)
    assert untimed["headers"]["expires"] is None
    # Capped by the config: a longer timeout still expires at the cap.
    config = get_config()
    use_config(replace(config, scheduler=replace(config.scheduler, timeout_seconds=5)))
    request = generate_text.build_request({"prompt": "x", "timeout_s": 60})
    cap_s = get_config().request_time_cap_s
    assert request_deadline(request, cap_s) == pytest.approx(request.created_at + 5)


def test_an_unknown_step_cache_fails_before_enqueue(redis_client) -> None:
    before = snapshot(redis_client)
    with pytest.raises(RequestValidationError) as info:
        generate_image.delay(prompt="x", step_cache="turbo")
    assert info.value.field == "step_cache"
    assert snapshot(redis_client) == before


@pytest.mark.parametrize("task", [generate_text, generate_image, probe], ids=lambda t: t.name)
def test_positional_args_are_refused(redis_client, task: OmniTask) -> None:
    before = snapshot(redis_client)
    with pytest.raises(RequestValidationError, match="keyword arguments") as info:
        task.apply_async(args=("a prompt",), kwargs={})
    assert info.value.field == "args"
    assert snapshot(redis_client) == before


def test_a_later_chain_stage_takes_the_previous_result_positionally(redis_client) -> None:
    request = create_multimodal_request("a lighthouse")
    previous = {"request_id": request.request_id, "image_prompt": "a lighthouse at dusk"}
    sent = multimodal_render.apply_async(args=(previous,), kwargs=request.to_message())
    assert sent.id == request.request_id
    ((_level, message),) = queued_messages(redis_client, DIT_QUEUE)
    assert message["headers"]["id"] == request.request_id
    assert message["headers"]["task"] == "omni_tasks.multimodal_render"
    assert message_kwargs(message)["request_id"] == request.request_id


def test_the_request_id_is_the_task_id(redis_client) -> None:
    sent = generate_text.delay(prompt="hello")
    ((_level, message),) = queued_messages(redis_client, "ar")
    kwargs = message_kwargs(message)
    assert message["headers"]["id"] == sent.id == kwargs["request_id"]
    assert kwargs["request_type"] == "text" and kwargs["prompt"] == "hello"
    named = generate_image.delay(prompt="fox", request_id="my-image-7")
    assert named.id == "my-image-7"
    assert where(redis_client, "my-image-7")[0] == DIT_QUEUE


def test_the_message_is_the_validated_request(redis_client) -> None:
    generate_image.delay(prompt="fox", width=128, steps=6, priority="low", seed=3)
    ((_level, message),) = queued_messages(redis_client, DIT_QUEUE)
    kwargs = message_kwargs(message)
    # Defaults are left out; what the request set is there, with its type and time.
    assert {k: kwargs[k] for k in ("prompt", "width", "steps", "priority", "seed")} == {
        "prompt": "fox",
        "width": 128,
        "steps": 6,
        "priority": "low",
        "seed": 3,
    }
    assert kwargs["request_type"] == "diffusion" and kwargs["created_at"] > 0
    assert "height" not in kwargs and "processing_stage" not in kwargs


def test_kwargsrepr_is_json_and_shows_an_input_image_by_size(redis_client, tmp_path) -> None:
    from PIL import Image

    path = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    generate_image.delay(prompt="fox", image=path.read_bytes(), seed=3)
    ((_level, message),) = queued_messages(redis_client, DIT_QUEUE)
    shown = json.loads(message["headers"]["kwargsrepr"])
    kwargs = message_kwargs(message)
    assert shown["image"] == f"<{len(kwargs['image'])} chars of base64>"
    assert {k: v for k, v in shown.items() if k != "image"} == {
        k: v for k, v in kwargs.items() if k != "image"
    }


def test_kwargsrepr_is_capped_like_celerys(redis_client) -> None:
    generate_text.delay(prompt="x" * 3000)
    ((_level, message),) = queued_messages(redis_client, "ar")
    assert len(message["headers"]["kwargsrepr"]) == KWARGSREPR_MAX_CHARS


@pytest.mark.parametrize("task", [*TASKS, multimodal_render], ids=lambda t: t.name)
def test_a_task_body_without_a_registered_handler_raises(task: OmniTask) -> None:
    assert task.handler is None
    with pytest.raises(ProcessingError, match="celery -A omni_tasks worker") as info:
        task.run_on_worker({"prompt": "x"})
    assert task.name in str(info.value)


def test_the_task_body_hands_its_message_to_the_registered_handler(monkeypatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def handler(
        task: OmniTask, kwargs: dict[str, Any], previous: Any, args: tuple[Any, ...]
    ) -> dict[str, Any]:
        calls.append((task.name, kwargs, previous, args))
        return {"request_id": kwargs["request_id"], "text": "ok"}

    monkeypatch.setattr(generate_text, "handler", handler)  # as workers.entry does
    monkeypatch.setattr(multimodal_render, "handler", handler)
    assert generate_text.run(request_id="r1", prompt="hi") == {"request_id": "r1", "text": "ok"}
    multimodal_render.run({"image_prompt": "p"}, request_id="r2", prompt="hi")
    generate_text.run("stray", request_id="r3", prompt="hi")  # the handler refuses args
    assert calls == [
        ("omni_tasks.generate_text", {"request_id": "r1", "prompt": "hi"}, None, ()),
        (
            "omni_tasks.multimodal_render",
            {"request_id": "r2", "prompt": "hi"},
            {"image_prompt": "p"},
            (),
        ),
        ("omni_tasks.generate_text", {"request_id": "r3", "prompt": "hi"}, None, ("stray",)),
    ]


def test_stage_queue_is_the_pool_of_the_task_stage(use_config) -> None:
    stages = {task.name: task.stage for task in [*TASKS, multimodal_render]}
    assert stages == {
        "omni_tasks.generate_text": "ar",
        "omni_tasks.generate_image": "dit",
        "omni_tasks.generate_multimodal": "ar",
        "omni_tasks.multimodal_prompt": "ar",
        "omni_tasks.probe": "ar",
        "omni_tasks.multimodal_render": "dit",
    }
    config = get_config()
    assert generate_text.stage_queue == config.ar.queue
    assert generate_image.stage_queue == config.diffusion.queue
    renamed = replace(
        config, ar=ARConfig(queue="text-pool"), diffusion=DiffusionConfig(queue="dit")
    )
    use_config(renamed)
    assert [t.stage_queue for t in (generate_text, multimodal_prompt, probe)] == ["text-pool"] * 3
    assert [t.stage_queue for t in (generate_image, multimodal_render)] == ["dit", "dit"]


@pytest.mark.parametrize("task", [*TASKS, multimodal_render], ids=lambda t: t.name)
def test_no_task_fixes_a_celery_queue(task: OmniTask) -> None:
    # Celery's `Task.queue` would override the router for every message of the task.
    assert getattr(task, "queue", None) is None
    assert task.typing is False  # the request model validates, and names the bad field


def test_request_types_per_task() -> None:
    assert generate_text.request_type_for({}) is RequestType.TEXT
    assert probe.request_type_for({}) is RequestType.TEXT
    assert multimodal_prompt.request_type_for({}) is RequestType.MULTIMODAL
    assert multimodal_render.request_type_for({}) is RequestType.MULTIMODAL
    with pytest.raises(NotImplementedError):
        OmniTask().request_type_for({})
    with pytest.raises(RequestValidationError) as info:
        generate_text.build_request({"prompt": "x", "request_type": "diffusion"})
    assert info.value.field == "request_type"
