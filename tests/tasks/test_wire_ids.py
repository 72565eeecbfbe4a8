"""Request ids on the producer side (docs/wire.md, "Request ids"), on real Redis with no
worker: the request id is the task id; a re-used id with the same request publishes
nothing; a re-used id with a different request raises `RequestConflictError` before
anything is enqueued; a chain's later stage and a republish are not checked; the same
rules hold for `send_task` by name on `omni_tasks.app`."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from helpers import DIT_QUEUE, KEYS, message_kwargs, queued_messages
from redis import Redis

from omni_tasks import (
    QueueFullError,
    RequestConflictError,
    RequestValidationError,
    create_diffusion_request,
    generate_image,
    generate_multimodal,
    generate_text,
    submit,
)
from omni_tasks.coordination import admission
from omni_tasks.coordination.idempotency import ACCEPTED_HEADER
from omni_tasks.coordination.ledger import REPUBLISHED_HEADER
from omni_tasks.tasks import app


def messages(client: Redis) -> list[dict[str, Any]]:
    """Every message waiting in the two pools' queues."""
    return [m for q in ("ar", "diffusion", DIT_QUEUE) for _, m in queued_messages(client, q)]


def ids(client: Redis) -> list[str]:
    return [m["headers"]["id"] for m in messages(client)]


def test_the_same_request_under_a_used_id_publishes_nothing(redis_client) -> None:
    first = generate_text.delay(prompt="hello", request_id="r-same", max_tokens=4)
    again = generate_text.delay(prompt="hello", request_id="r-same", max_tokens=4)
    assert first.id == again.id == "r-same"
    assert ids(redis_client) == ["r-same"]
    assert admission.count(redis_client, "ar") == 1
    # The message carries the producer's mark: the worker does not check the id again.
    (message,) = messages(redis_client)
    assert message["headers"][ACCEPTED_HEADER] is True


def test_a_different_request_under_a_used_id_is_refused_before_enqueue(redis_client) -> None:
    generate_text.delay(prompt="hello", request_id="r-used")
    before = {k: redis_client.dump(k) for k in redis_client.scan_iter(count=1000)}
    for changed in ({"prompt": "goodbye"}, {"prompt": "hello", "max_tokens": 5}):
        with pytest.raises(RequestConflictError) as info:
            generate_text.delay(request_id="r-used", **changed)
        assert info.value.field == "request_id" and info.value.request_id == "r-used"
        assert str(info.value).startswith("request_id: 'r-used' was accepted before")
    after = {k: redis_client.dump(k) for k in redis_client.scan_iter(count=1000)}
    assert after == before  # nothing enqueued, admitted or recorded


def test_the_creation_time_is_not_part_of_the_request(redis_client) -> None:
    generate_text.delay(prompt="hello", request_id="r-time", created_at=1_000.0)
    generate_text.delay(prompt="hello", request_id="r-time", created_at=2_000.0)
    assert ids(redis_client) == ["r-time"]


def test_an_image_without_a_seed_repeats_and_an_explicit_other_seed_conflicts(
    redis_client,
) -> None:
    sent = [generate_image.delay(prompt="a fox", request_id="img-1") for _ in range(2)]
    assert [s.id for s in sent] == ["img-1", "img-1"]
    (message,) = messages(redis_client)
    seed = message_kwargs(message)["seed"]  # fixed at the producer, from the id
    assert create_diffusion_request("a fox", request_id="img-1").seed == seed
    assert create_diffusion_request("a fox", request_id="img-2").seed != seed
    submit(create_diffusion_request("a fox", request_id="img-1"))  # submit: the same rules
    assert ids(redis_client) == ["img-1"]
    with pytest.raises(RequestConflictError):
        generate_image.delay(prompt="a fox", request_id="img-1", seed=(seed + 1) % 2**32)


def test_a_multimodal_repeat_publishes_no_second_chain(redis_client) -> None:
    first = generate_multimodal.delay(prompt="a lighthouse", request_id="mm-1", max_tokens=4)
    again = generate_multimodal.delay(prompt="a lighthouse", request_id="mm-1", max_tokens=4)
    assert first.id == again.id == "mm-1"
    assert ids(redis_client) == ["mm-1.prompt"]
    with pytest.raises(RequestConflictError):
        generate_multimodal.delay(prompt="a harbour", request_id="mm-1")


def test_the_request_id_is_the_task_id(redis_client) -> None:
    sent = generate_text.apply_async(kwargs={"prompt": "x"}, task_id="given-id")
    (message,) = messages(redis_client)
    assert sent.id == message["headers"]["id"] == message_kwargs(message)["request_id"]
    with pytest.raises(RequestValidationError) as info:
        generate_text.apply_async(kwargs={"prompt": "x", "request_id": "a"}, task_id="b")
    assert info.value.field == "request_id" and "'b'" in info.value.message
    assert ids(redis_client) == ["given-id"]


def test_a_republish_and_a_later_stage_are_not_checked(redis_client) -> None:
    generate_text.delay(prompt="lost?", request_id="r-again")
    generate_text.apply_async(
        kwargs={"prompt": "lost?", "request_id": "r-again"},
        headers={REPUBLISHED_HEADER: True},
    )
    assert ids(redis_client) == ["r-again", "r-again"]  # the reaper's second publish
    assert admission.count(redis_client, "ar") == 1


def test_a_refused_admission_leaves_the_id_free(redis_client) -> None:
    generate_text.delay(prompt="first", request_id="full-1")
    with admission.max_queue_size(1), pytest.raises(QueueFullError):
        generate_text.delay(prompt="second", request_id="full-2")
    assert not redis_client.exists(KEYS.request_fingerprint("full-2"))
    generate_text.delay(prompt="another", request_id="full-2")  # not a conflict
    assert sorted(ids(redis_client)) == ["full-1", "full-2"]


def test_send_task_by_name_carries_the_request_and_follows_the_same_rules(
    redis_client,
) -> None:
    sent = app.send_task("omni_tasks.generate_text", kwargs={"prompt": "by name"})
    (message,) = messages(redis_client)
    kwargs = message_kwargs(message)
    assert kwargs["request_id"] == sent.id and kwargs["created_at"] > 0
    assert json.loads(message["headers"]["kwargsrepr"])["prompt"] == "by name"
    again = app.send_task("omni_tasks.generate_text", kwargs={"prompt": "by name"}, task_id=sent.id)
    assert again.id == sent.id and len(messages(redis_client)) == 1
    with pytest.raises(RequestConflictError):
        app.send_task("omni_tasks.generate_text", kwargs={"prompt": "other"}, task_id=sent.id)
    with pytest.raises(RequestValidationError) as info:
        app.send_task("omni_tasks.generate_text", args=["positional"])
    assert info.value.field == "args"
    with pytest.raises(RequestValidationError) as info:
        app.send_task("omni_tasks.generate_image", kwargs={"prompt": "x", "width": 33})
    assert info.value.field == "width"
    assert len(messages(redis_client)) == 1


def test_send_task_of_multimodal_by_name_keeps_the_callers_id(redis_client) -> None:
    sent = app.send_task("omni_tasks.generate_multimodal", kwargs={"prompt": "a lighthouse"})
    (message,) = messages(redis_client)
    assert message["headers"]["task"] == "omni_tasks.generate_multimodal"
    _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert kwargs["request_id"] == sent.id and kwargs["request_type"] == "multimodal"
