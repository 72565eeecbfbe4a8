"""The Celery router: each SchedulerType puts a request on the expected queue and priority
sub-list, whatever way it is sent; a repeat DiT request goes to the live worker that
holds its DiT cache keys."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from helpers import DIT_QUEUE, KEYS, LARGE, SMALL, queued_messages, where
from redis import Redis

from omni_tasks import (
    RequestValidationError,
    SchedulerType,
    app,
    create_diffusion_request,
    create_multimodal_request,
    generate_image,
    generate_multimodal,
    generate_text,
    get_config,
    lora,
)
from omni_tasks.config import ModelEntry
from omni_tasks.coordination import cache_directory
from omni_tasks.coordination.client import get_redis
from omni_tasks.requests import OmniRequest
from omni_tasks.scheduling.policies import Route, create_policy
from omni_tasks.tasks.router import OmniRouter, resolve_route

# (scheduler type) -> expected (queue, priority) for: text high, text normal, text low,
# long text normal (1000 tokens), small image low, large image low, multimodal first stage.
EXPECTED = {
    SchedulerType.FIFO: [
        ("ar", 0),
        ("ar", 0),
        ("ar", 0),
        ("ar", 0),
        (DIT_QUEUE, 0),
        (DIT_QUEUE, 0),
        ("ar", 0),
    ],
    SchedulerType.PRIORITY: [
        ("ar", 0),
        ("ar", 6),
        ("ar", 9),
        ("ar", 6),
        (DIT_QUEUE, 9),
        (DIT_QUEUE, 9),
        ("ar", 6),
    ],
    SchedulerType.MULTIMODAL: [
        ("ar", 1),
        ("ar", 5),
        ("ar", 7),
        ("ar", 5),
        (DIT_QUEUE, 7),
        (DIT_QUEUE, 7),
        ("ar", 5),
    ],
    SchedulerType.DIFFUSION: [
        ("ar", 0),
        ("ar", 4),
        ("ar", 6),
        ("ar", 4),
        (DIT_QUEUE, 6),
        (DIT_QUEUE, 8),
        ("ar", 4),
    ],
    SchedulerType.HYBRID: [
        ("ar", 0),
        ("ar", 4),
        ("ar", 6),
        ("ar", 6),
        (DIT_QUEUE, 6),
        (DIT_QUEUE, 8),
        ("ar", 4),
    ],
}
WORKER = "diffusion-abc123@host"


@pytest.mark.parametrize("scheduler_type", list(SchedulerType), indirect=True)
def test_delay_routes_by_policy(redis_client, scheduler_type: SchedulerType) -> None:
    sent = [
        generate_text.delay(prompt="a", priority="high"),
        generate_text.delay(prompt="b", priority="normal"),
        generate_text.delay(prompt="c", priority="low"),
        generate_text.delay(prompt="d", priority="normal", max_tokens=1000),
        generate_image.delay(prompt="e", priority="low", **SMALL),
        generate_image.delay(prompt="f", priority="low", **LARGE),
        generate_multimodal.delay(prompt="g", priority="normal", **SMALL).parent,
    ]
    assert [where(redis_client, r.id) for r in sent] == EXPECTED[scheduler_type]


@pytest.mark.parametrize("scheduler_type", [SchedulerType.PRIORITY], indirect=True)
def test_send_task_by_name_is_routed_too(redis_client, scheduler_type: SchedulerType) -> None:
    sent = app.send_task("omni_tasks.generate_text", kwargs={"prompt": "x", "priority": "low"})
    assert where(redis_client, sent.id) == ("ar", 9)
    image = app.send_task("omni_tasks.generate_image", kwargs={"prompt": "y", "priority": "high"})
    assert where(redis_client, image.id) == (DIT_QUEUE, 0)
    before = queued_messages(redis_client, "ar")
    with pytest.raises(RequestValidationError) as info:
        app.send_task("omni_tasks.generate_text", kwargs={"prompt": "x", "max_tokens": 0})
    assert info.value.field == "max_tokens"
    assert queued_messages(redis_client, "ar") == before  # nothing sent


@pytest.mark.parametrize("scheduler_type", [SchedulerType.PRIORITY], indirect=True)
def test_router_answers_queue_and_priority(scheduler_type: SchedulerType) -> None:
    router = OmniRouter()
    route = router("omni_tasks.generate_image", (), {"prompt": "x", "priority": "high"}, {})
    assert route == {"queue": DIT_QUEUE, "priority": 0}
    task = app.tasks["omni_tasks.multimodal_render"]  # a chain's later stage: its own stage
    later = router(task.name, (), {"prompt": "x", "request_type": "multimodal"}, {}, task=task)
    assert later == {"queue": DIT_QUEUE, "priority": 6}


def test_router_leaves_other_tasks_to_celery() -> None:
    router = OmniRouter()
    assert router("celery.backend_cleanup", (), {}, {}) is None
    assert router("someone_else.task", (), {"prompt": "x"}, {}) is None


def test_router_follows_the_current_config(use_config) -> None:
    router = OmniRouter()
    first = router.current_policy(get_config())
    assert router.current_policy(get_config()) is first  # kept while the config object is the same
    assert first.scheduler_type is get_config().scheduler.scheduler_type
    config = get_config()
    use_config(
        replace(config, scheduler=replace(config.scheduler, scheduler_type=SchedulerType.FIFO))
    )
    assert router.current_policy(get_config()).scheduler_type is SchedulerType.FIFO
    route = router("omni_tasks.generate_text", (), {"prompt": "x", "priority": "low"}, {})
    assert route == {"queue": "ar", "priority": 0}


def beat(client: Redis, hostname: str, concurrency: int = 2) -> None:
    """A live worker's heartbeat, as the worker side writes it (expiring)."""
    info = {"hostname": hostname, "queues": '["diffusion"]', "stages": '["dit"]'}
    client.hset(KEYS.worker(hostname), mapping={**info, "concurrency": concurrency})
    client.expire(KEYS.worker(hostname), 30)


def hold(hostname: str, request: OmniRequest) -> None:
    """Record that `hostname` cached the request's latents (as its DiT cache does)."""
    latents = cache_directory.dit_keys(request, get_config()).latents
    cache_directory.record_insert(get_redis(), hostname, "diffusion", latents, 1024)


def test_a_repeat_goes_to_the_live_worker_holding_its_keys(redis_client) -> None:
    fields = {"prompt": "a red fox", "seed": 5, "priority": "high", **SMALL}
    beat(redis_client, WORKER)
    hold(WORKER, create_diffusion_request(**fields))
    pool_level = create_policy(get_config()).route(create_diffusion_request(**fields)).level
    sent = generate_image.delay(**fields)
    own = KEYS.worker_queue(WORKER)
    assert where(redis_client, sent.id, queues=(own,)) == (own, pool_level)
    other_seed = generate_image.delay(**{**fields, "seed": 6})  # same prompt: embeddings only
    assert where(redis_client, other_seed.id) == (DIT_QUEUE, pool_level)


def test_the_embeddings_holder_gets_a_new_seed_of_a_known_prompt(redis_client) -> None:
    fields = {"prompt": "a red fox", "seed": 5, "priority": "normal", **SMALL}
    beat(redis_client, WORKER)
    embeddings = cache_directory.dit_keys(create_diffusion_request(**fields), get_config())
    cache_directory.record_insert(get_redis(), WORKER, "diffusion", embeddings.embeddings, 512)
    sent = generate_image.delay(**{**fields, "seed": 99})
    own = KEYS.worker_queue(WORKER)
    assert where(redis_client, sent.id, queues=(own,))[0] == own


def test_no_affinity_for_a_dead_holder_a_disabled_pool_or_other_stages(
    redis_client, use_config
) -> None:
    fields = {"prompt": "a red fox", "seed": 5, "priority": "normal", **SMALL}
    request = create_diffusion_request(**fields)
    hold(WORKER, request)
    policy = create_policy(get_config())
    pool = Route(DIT_QUEUE, policy.route(request, "dit").level)  # the model's queue
    assert resolve_route(request, "dit", policy, redis_client) == pool  # no heartbeat: dead
    beat(redis_client, WORKER)
    assert resolve_route(request, "dit", policy, redis_client) == Route(
        KEYS.worker_queue(WORKER), pool.level
    )
    # The DiT stage of a MULTIMODAL request renders a prompt the AR stage has not written yet.
    multi = create_multimodal_request(**fields)
    hold(WORKER, multi)
    assert resolve_route(multi, "dit", policy, redis_client) == Route(DIT_QUEUE, pool.level)
    assert resolve_route(multi, "ar", policy, redis_client) == policy.route(multi, "ar")
    config = get_config()
    off = replace(config, diffusion=replace(config.diffusion, cache_affinity=False))
    use_config(off)
    assert resolve_route(request, "dit", create_policy(off), redis_client) == pool
    sent = generate_image.delay(**fields)
    assert where(redis_client, sent.id) == (DIT_QUEUE, pool.level)


def test_a_directory_failure_routes_to_the_pool(use_config, caplog) -> None:
    request = create_diffusion_request("a red fox", seed=5)
    config = get_config()
    unreachable = replace(config, redis_url="redis://127.0.0.1:1/11")  # nothing listens there
    use_config(unreachable)
    policy = create_policy(unreachable)
    with caplog.at_level(logging.WARNING, logger="omni_tasks.tasks.router"):
        found = resolve_route(request, "dit", policy, get_redis(unreachable.redis_url))
    assert found == Route(DIT_QUEUE, policy.route(request, "dit").level)
    assert "cache directory lookup failed" in caplog.text


@pytest.fixture()
def two_models(use_config) -> None:
    """The process config with `flux-b` registered beside the default `tiny-flux`, and
    one LoRA adapter (`ink`)."""
    config = get_config()
    use_config(replace(config, models={"flux-b": ModelEntry()}, loras={"ink": "loras/ink"}))


@pytest.mark.parametrize("scheduler_type", [SchedulerType.PRIORITY], indirect=True)
def test_each_model_has_its_queue(redis_client, scheduler_type, two_models) -> None:
    b = generate_image.delay(prompt="b", model="flux-b", priority="high", **SMALL)
    default = generate_image.delay(prompt="d", priority="low", **SMALL)
    named = generate_image.delay(prompt="n", model="tiny-flux", priority="low", **SMALL)
    queues = ("diffusion", DIT_QUEUE, "diffusion.flux-b")
    assert where(redis_client, b.id, queues) == ("diffusion.flux-b", 0)
    assert where(redis_client, default.id, queues) == (DIT_QUEUE, 9)
    assert where(redis_client, named.id, queues) == (DIT_QUEUE, 9)
    text = generate_text.delay(prompt="t", model="any text model")  # not checked here
    assert where(redis_client, text.id) == ("ar", 6)


def test_a_model_queue_is_declared_as_a_pool_queue(two_models) -> None:
    """With x-max-priority, as workers declare it (RabbitMQ refuses a queue declared
    again with other arguments), on its own direct exchange."""
    router = OmniRouter()
    route = router("omni_tasks.generate_image", (), {"prompt": "x", "model": "flux-b"}, {})
    assert route is not None and route["queue"] == "diffusion.flux-b"
    queue = app.amqp.queues["diffusion.flux-b"]
    assert queue.queue_arguments == {"x-max-priority": 10}
    assert (queue.exchange.name, queue.exchange.type) == ("diffusion.flux-b", "direct")


@pytest.mark.parametrize("scheduler_type", [SchedulerType.PRIORITY], indirect=True)
def test_a_multimodal_dit_stage_goes_to_its_models_queue(
    redis_client, scheduler_type, two_models
) -> None:
    router = OmniRouter()
    task = app.tasks["omni_tasks.multimodal_render"]  # routed when the AR worker sends it
    kwargs = {"prompt": "x", "request_type": "multimodal", "model": "flux-b"}
    assert router(task.name, (), kwargs, {}, task=task) == {
        "queue": "diffusion.flux-b",
        "priority": 6,
    }
    request = create_multimodal_request("x", model="flux-b")
    policy = create_policy(get_config())
    assert resolve_route(request, "ar", policy, redis_client).queue == "ar"
    assert resolve_route(request, "dit", policy, redis_client).queue == "diffusion.flux-b"


def test_affinity_stays_within_a_model(redis_client, two_models) -> None:
    """A holder's keys name its model: the same request asked of another model, or the
    same adapter on another model, goes to that model's queue."""
    fields = {"prompt": "a red fox", "seed": 5, **SMALL}
    beat(redis_client, WORKER)  # serves flux-b
    hold(WORKER, create_diffusion_request(**fields, model="flux-b"))
    policy = create_policy(get_config())
    own = KEYS.worker_queue(WORKER)
    assert (
        resolve_route(
            create_diffusion_request(**fields, model="flux-b"), "dit", policy, redis_client
        ).queue
        == own
    )
    for other in (
        create_diffusion_request(**fields),
        create_diffusion_request(**fields, model="tiny-flux"),
    ):
        assert resolve_route(other, "dit", policy, redis_client).queue == DIT_QUEUE
    adapter = lora.directory_key("ink", "flux-b")
    cache_directory.record_insert(get_redis(), WORKER, "diffusion", adapter, 4096)
    styled = {"prompt": "a new prompt", "lora": ["ink"], **SMALL}
    on_b = create_diffusion_request(**styled, model="flux-b")
    assert cache_directory.affinity_keys(on_b, get_config())[1] == adapter
    assert resolve_route(on_b, "dit", policy, redis_client).queue == own
    assert (
        resolve_route(create_diffusion_request(**styled), "dit", policy, redis_client).queue
        == DIT_QUEUE
    )
    multi = create_multimodal_request("x", lora=["ink"], model="flux-b")  # adapters only
    assert resolve_route(multi, "dit", policy, redis_client).queue == own
