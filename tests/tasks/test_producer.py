"""Producer operations: `submit` enqueues a validated request on its pool (with a given
policy's route when one is given); `cancel` revokes every task id of a request, with
flags in Redis that outlive the live workers' revoke lists."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import DIT_QUEUE, KEYS, message_kwargs, queued_messages, where

from omni_tasks import (
    RequestType,
    SchedulerType,
    cancel,
    create_diffusion_request,
    create_image_request,
    create_multimodal_request,
    create_text_request,
    get_config,
    submit,
)
from omni_tasks.scheduling.policies import create_policy, first_stage
from omni_tasks.tasks.producer import REVOKE_TTL_S
from omni_tasks.tasks.router import resolve_route

PNG_1PX = (  # a 1x1 PNG, base64
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmM"
    "IQAAAABJRU5ErkJggg=="
)


def test_submit_uses_the_request_id_as_task_id(redis_client) -> None:
    request = create_text_request("hello", request_id="my-request-1")
    result = submit(request)
    assert result.id == "my-request-1"
    multi = submit(create_multimodal_request("cat", request_id="mm-1"))
    assert multi.id == "mm-1" and multi.parent.id == "mm-1.prompt"


def test_submit_puts_each_type_on_its_pool(redis_client) -> None:
    policy = create_policy(get_config())
    requests = [
        create_text_request("t", priority="low"),
        create_diffusion_request("d", priority="high"),
        create_image_request("i", image=PNG_1PX),
    ]
    for request in requests:
        submit(request)
        route = resolve_route(request, first_stage(request), policy, redis_client)
        assert where(redis_client, request.request_id) == (route.queue, route.level)
    assert [where(redis_client, r.request_id)[0] for r in requests] == ["ar", DIT_QUEUE, DIT_QUEUE]


def test_submit_with_a_policy_uses_its_route(redis_client) -> None:
    assert get_config().scheduler.scheduler_type is not SchedulerType.FIFO
    fifo = create_policy(get_config(), SchedulerType.FIFO)
    low = create_text_request("t", priority="low")
    submit(low, policy=fifo)
    assert where(redis_client, low.request_id) == ("ar", 0)
    image = create_diffusion_request("d", priority="low")
    submit(image, policy=fifo)
    assert where(redis_client, image.request_id) == (DIT_QUEUE, 0)
    multi = create_multimodal_request("m", priority="low")
    submit(multi, policy=fifo)
    assert where(redis_client, multi.request_id + ".prompt") == ("ar", 0)


def test_explicit_options_win_over_the_policy(redis_client) -> None:
    fifo = create_policy(get_config(), SchedulerType.FIFO)
    request = create_text_request("t", priority="low")
    submit(request, policy=fifo, priority=3)
    assert where(redis_client, request.request_id) == ("ar", 3)


def test_submit_sends_the_request_message_to_the_task_of_its_type(redis_client) -> None:
    request = create_text_request("t", max_tokens=9, request_id="r-9")
    submit(request)
    ((_, message),) = queued_messages(redis_client, "ar")
    assert message["headers"]["task"] == "omni_tasks.generate_text"
    assert message_kwargs(message) == request.to_message()
    edit = create_image_request("i", image=PNG_1PX, request_id="e-1")
    submit(edit)
    ((_, message),) = queued_messages(redis_client, DIT_QUEUE)
    assert message["headers"]["task"] == "omni_tasks.generate_image"
    assert message_kwargs(message) == edit.to_message()


def test_cancel_a_multimodal_request_flags_both_of_its_tasks(redis_client) -> None:
    request = create_multimodal_request("m", request_id="mm-2")
    submit(request)
    cancel("mm-2", RequestType.MULTIMODAL)
    for task_id in ("mm-2.prompt", "mm-2"):
        assert redis_client.get(KEYS.revoked(task_id)) == "1", task_id
        assert REVOKE_TTL_S - 60 < redis_client.ttl(KEYS.revoked(task_id)) <= REVOKE_TTL_S


@pytest.mark.parametrize("kind", [RequestType.TEXT, RequestType.DIFFUSION, RequestType.IMAGE])
def test_cancel_a_one_stage_request_flags_its_task(redis_client, kind: RequestType) -> None:
    cancel("one-1", kind)
    assert redis_client.get(KEYS.revoked("one-1")) == "1"
    assert not redis_client.exists(KEYS.revoked("one-1.prompt"))


def test_cancel_without_a_type_flags_both_possible_tasks(redis_client) -> None:
    cancel("who-knows")
    assert redis_client.exists(KEYS.revoked("who-knows"), KEYS.revoked("who-knows.prompt")) == 2


PRODUCER = r"""
import sys, time
from omni_tasks import SchedulerError, generate_text
start = time.monotonic()
try:
    generate_text.delay(prompt="nobody home")
except SchedulerError as exc:
    print(f"{time.monotonic() - start:.2f} {exc}")
"""


@pytest.mark.parametrize("host", ["127.0.0.1:1", "10.255.255.1:6379"])
def test_a_producer_that_cannot_reach_redis_gets_a_clear_error_in_bounded_time(
    host: str,
) -> None:
    env = {**os.environ, "OMNI_REDIS_URL": f"redis://:secret@{host}/0"}
    out = subprocess.run(
        [sys.executable, "-c", PRODUCER], env=env, capture_output=True, text=True, timeout=60
    )
    elapsed, _, message = out.stdout.strip().partition(" ")
    assert "not sent: cannot reach redis://" in message, out.stdout + out.stderr
    assert "nothing was accepted" in message
    assert "secret" not in out.stdout + out.stderr
    assert float(elapsed) < 10
