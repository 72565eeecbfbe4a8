"""The public tasks: request type per task, the two-stage MULTIMODAL chain and its task
ids. (Task names: tests/tasks/test_celery_app.py.)"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from helpers import DIT_QUEUE, message_kwargs, queued_messages, where

from omni_tasks import (
    RequestType,
    SchedulerType,
    create_multimodal_request,
    generate_image,
    generate_multimodal,
    generate_text,
    get_config,
)
from omni_tasks.scheduling.policies import create_policy
from omni_tasks.tasks import (
    TASK_FOR_TYPE,
    multimodal_chain,
    multimodal_prompt,
    multimodal_render,
    probe,
    task_ids_of,
)

PNG_1PX = (  # a 1x1 PNG, base64
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmM"
    "IQAAAABJRU5ErkJggg=="
)


def embedded_chain(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The signatures a chain's first message carries for its later stages."""
    _args, _kwargs, embed = json.loads(base64.b64decode(message["body"]))
    return embed["chain"] or []


def test_task_ids_of_a_request() -> None:
    assert task_ids_of("r1", RequestType.TEXT) == ["r1"]
    assert task_ids_of("r1", RequestType.DIFFUSION) == ["r1"]
    assert task_ids_of("r1", RequestType.IMAGE) == ["r1"]
    assert task_ids_of("r1", RequestType.MULTIMODAL) == ["r1.prompt", "r1"]
    assert task_ids_of("r1") == ["r1.prompt", "r1"]  # type unknown: both, to be safe


def test_a_task_for_every_request_type() -> None:
    assert set(TASK_FOR_TYPE) == set(RequestType)
    assert TASK_FOR_TYPE[RequestType.TEXT] is generate_text
    assert TASK_FOR_TYPE[RequestType.DIFFUSION] is generate_image
    assert TASK_FOR_TYPE[RequestType.IMAGE] is generate_image
    assert TASK_FOR_TYPE[RequestType.MULTIMODAL] is generate_multimodal


def test_generate_image_is_an_edit_when_given_an_image(redis_client) -> None:
    assert generate_image.request_type_for({"prompt": "x"}) is RequestType.DIFFUSION
    assert generate_image.request_type_for({"image": PNG_1PX}) is RequestType.IMAGE
    assert generate_image.request_type_for({"request_type": "image"}) is RequestType.IMAGE
    assert generate_image.request_type_for({"request_type": RequestType.IMAGE}) is RequestType.IMAGE
    edit = generate_image.delay(prompt="make it blue", image=PNG_1PX)
    plain = generate_image.delay(prompt="a fox")
    kinds = {
        m["headers"]["id"]: message_kwargs(m)["request_type"]
        for _, m in queued_messages(redis_client, DIT_QUEUE)
    }
    assert kinds == {edit.id: "image", plain.id: "diffusion"}


def test_probe_is_a_text_request_on_the_ar_pool(redis_client) -> None:
    sent = probe.delay(prompt="ping")
    assert where(redis_client, sent.id)[0] == "ar"
    ((_, message),) = queued_messages(redis_client, "ar")
    assert message["headers"]["task"] == "omni_tasks.probe"
    assert message_kwargs(message)["request_type"] == "text"


def test_multimodal_delay_sends_the_ar_stage_with_the_dit_stage_chained(redis_client) -> None:
    sent = generate_multimodal.delay(prompt="a lighthouse", priority="high", max_tokens=8)
    assert sent.parent.id == sent.id + ".prompt"
    assert queued_messages(redis_client, DIT_QUEUE) == []  # the AR worker sends it later
    ((_, message),) = queued_messages(redis_client, "ar")
    assert message["headers"]["task"] == "omni_tasks.multimodal_prompt"
    assert message["headers"]["id"] == sent.id + ".prompt"
    kwargs = message_kwargs(message)
    assert (kwargs["request_id"], kwargs["request_type"]) == (sent.id, "multimodal")
    (render,) = embedded_chain(message)
    assert render["task"] == "omni_tasks.multimodal_render"
    assert render["options"]["task_id"] == sent.id
    assert render["kwargs"] == kwargs  # both stages carry the same request
    assert "queue" not in render["options"]  # routed by the router when the AR worker sends it


def test_multimodal_task_id_becomes_the_request_id(redis_client) -> None:
    sent = generate_multimodal.apply_async(kwargs={"prompt": "a cat"}, task_id="mm-7")
    assert (sent.id, sent.parent.id) == ("mm-7", "mm-7.prompt")
    ((_, message),) = queued_messages(redis_client, "ar")
    assert message_kwargs(message)["request_id"] == "mm-7"


def test_multimodal_chain_with_a_policy_routes_both_stages_by_it(redis_client) -> None:
    request = create_multimodal_request("a lighthouse", priority="low")
    config_policy = create_policy(get_config())
    fifo = create_policy(get_config(), SchedulerType.FIFO)
    assert config_policy.route(request).level != 0  # the config's type ranks low work
    multimodal_chain(request, fifo).apply_async()
    assert where(redis_client, request.request_id + ".prompt") == ("ar", 0)
    ((_, message),) = queued_messages(redis_client, "ar")
    (render,) = embedded_chain(message)
    assert (render["options"]["queue"], render["options"]["priority"]) == (DIT_QUEUE, 0)


@pytest.mark.parametrize(
    ("task", "stage"),
    [(multimodal_prompt, "ar"), (multimodal_render, "dit")],
    ids=["prompt", "render"],
)
def test_the_chain_stages(task, stage: str) -> None:
    assert task.request_type is RequestType.MULTIMODAL
    assert task.stage == stage
    assert task.takes_previous_result is (stage == "dit")
