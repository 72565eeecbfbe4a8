"""Which messages a worker publishes again (`workers.lifecycle.reroute`), on kombu
messages as the consumer gets them: a DiT message naming a model this worker does not
serve is passed on to that model's queue, whatever its origin and broker, with its
priority and (for one a producer accepted) its acceptance; never back to the queue it
came from. The cluster runs of the same rules: tests/integration/test_model_routing.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from helpers import KEYS
from kombu.message import Message

from omni_tasks import RequestValidationError, app, get_config
from omni_tasks.config import ModelEntry, SchedulerType
from omni_tasks.coordination import cache_directory, idempotency
from omni_tasks.coordination.client import get_redis
from omni_tasks.tasks.transport import PUBLISHED_PROPERTY
from workers.lifecycle.reroute import other_model, pass_on_options, reroute_reason

IMAGE = app.tasks["omni_tasks.generate_image"]
RENDER = app.tasks["omni_tasks.multimodal_render"]
PROMPT = app.tasks["omni_tasks.multimodal_prompt"]
FLUX_B = "diffusion.flux-b"


@pytest.fixture()
def models(use_config) -> None:
    """This worker serves tiny-flux; flux-b is registered too (priority scheduler)."""
    config = get_config()
    scheduler = replace(config.scheduler, scheduler_type=SchedulerType.PRIORITY)
    use_config(replace(config, models={"flux-b": ModelEntry()}, scheduler=scheduler))


def message(
    kwargs: dict[str, Any],
    queue: str = "diffusion",
    priority: int | None = None,
    ours: bool = False,
    accepted: bool = False,
) -> tuple[Message, list[Any]]:
    """A kombu message as the consumer receives it, and its decoded body."""
    properties: dict[str, Any] = {} if priority is None else {"priority": priority}
    headers: dict[str, Any] = {"id": "req-1", "task": IMAGE.name}
    if ours:
        properties[PUBLISHED_PROPERTY] = True
    if accepted:
        headers[idempotency.ACCEPTED_HEADER] = True
    found = Message(
        body=b"", delivery_info={"routing_key": queue}, properties=properties, headers=headers
    )
    return found, [[], kwargs, None]


def test_a_dit_message_for_another_model_is_passed_on_whatever_its_origin(models) -> None:
    for_b = {"prompt": "x", "model": "flux-b"}
    for ours in (False, True):
        found, body = message(for_b, priority=5, ours=ours)
        assert "for model 'flux-b'" in str(reroute_reason(IMAGE, found, body))
    found, body = message({"prompt": "x", "model": "flux-b"}, priority=5)
    assert other_model(RENDER, body) == "flux-b"  # a multimodal DiT stage too
    assert other_model(PROMPT, body) is None  # its AR stage runs on the AR pool
    for kwargs in ({"prompt": "x"}, {"prompt": "x", "model": "tiny-flux"}):
        found, body = message(kwargs, priority=5, ours=True)
        assert reroute_reason(IMAGE, found, body) is None  # runs here


def test_on_rabbitmq_a_message_for_another_model_is_passed_on_too(models, use_config) -> None:
    use_config(replace(get_config(), broker_url="amqp://guest:guest@127.0.0.1:5672//"))
    found, body = message({"prompt": "x", "model": "flux-b"}, priority=6)  # AMQP 6: level 3
    assert reroute_reason(IMAGE, found, body) is not None
    options = pass_on_options(IMAGE, found, body[1])
    assert (options["queue"], options["priority"]) == (FLUX_B, 3)
    found, body = message({"prompt": "x"}, priority=6)
    assert reroute_reason(IMAGE, found, body) is None  # no other check on RabbitMQ


def test_passed_on_with_its_priority_and_its_acceptance(redis_client, models) -> None:
    kwargs = {"prompt": "x", "model": "flux-b", "priority": "low"}
    found, _ = message(kwargs, priority=0, ours=True, accepted=True)
    options = pass_on_options(IMAGE, found, kwargs)
    assert (options["queue"], options["priority"]) == (FLUX_B, 0)  # level 0 kept
    assert options["headers"][idempotency.ACCEPTED_HEADER] is True  # not checked again
    foreign, _ = message(kwargs)  # another client's, sent without a priority
    options = pass_on_options(IMAGE, foreign, kwargs)
    assert (options["queue"], options["priority"]) == (FLUX_B, 9)  # its class: low
    assert "headers" not in options  # accepted (its id checked) as it is passed on
    foreign, _ = message(kwargs, priority=4)
    assert pass_on_options(IMAGE, foreign, kwargs)["priority"] == 4


def test_never_passed_on_to_the_queue_it_came_from(redis_client, models) -> None:
    kwargs = {"prompt": "a fox", "seed": 1, "model": "flux-b"}
    holder = "b-worker@host"
    redis_client.hset(KEYS.worker(holder), mapping={"hostname": holder, "concurrency": 2})
    request = IMAGE.build_request(kwargs, "req-1")
    latents = cache_directory.dit_keys(request, get_config()).latents
    cache_directory.record_insert(get_redis(), holder, "diffusion", latents, 1024)
    own = KEYS.worker_queue(holder)
    found, _ = message(kwargs, ours=True)
    assert pass_on_options(IMAGE, found, kwargs)["queue"] == own  # the holder serves flux-b
    found, _ = message(kwargs, queue=own, ours=True)  # came from there: its model's queue
    assert pass_on_options(IMAGE, found, kwargs)["queue"] == FLUX_B
    redis_client.delete(KEYS.worker(holder))  # gone: its model's queue is the route
    found, _ = message(kwargs, queue=FLUX_B, ours=True)  # a worker reads another's queue
    with pytest.raises(RequestValidationError) as info:
        pass_on_options(IMAGE, found, kwargs)
    assert info.value.field == "model" and "loop" in info.value.message


def test_an_unregistered_model_is_refused_when_passed_on(redis_client, models) -> None:
    kwargs = {"prompt": "x", "model": "nope"}
    found, body = message(kwargs, priority=5)
    assert reroute_reason(IMAGE, found, body) is not None
    with pytest.raises(RequestValidationError) as info:
        pass_on_options(IMAGE, found, kwargs)
    assert info.value.field == "model" and "flux-b, tiny-flux" in info.value.message
