"""The Celery app's settings: JSON only, late acks, Redis priority lists with kombu's
separator, a visibility timeout above the longest task, the worker side loaded through
`imports`, and the task names (the contract with workers); with a RabbitMQ broker, none
of the Redis-only options and levels published as AMQP priorities."""

from __future__ import annotations

import json
from dataclasses import replace

from omni_tasks import app, get_config
from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination.keys import PRIORITY_SEP
from omni_tasks.tasks.celery_app import (
    OmniAMQP,
    amqp_priority,
    celery_settings,
    delivered_level,
    settings_for_process,
)

TASK_NAMES = {
    "omni_tasks.generate_text",
    "omni_tasks.generate_chat",
    "omni_tasks.generate_image",
    "omni_tasks.generate_multimodal",
    "omni_tasks.generate_video",
    "omni_tasks.generate_audio",
    "omni_tasks.generate_speech",
    "omni_tasks.multimodal_prompt",
    "omni_tasks.multimodal_render",
    "omni_tasks.probe",
}


def test_json_only_on_the_wire() -> None:
    conf = app.conf
    assert conf.accept_content == ["json"]
    assert conf.result_accept_content == ["json"]
    assert (conf.task_serializer, conf.result_serializer, conf.event_serializer) == (
        "json",
        "json",
        "json",
    )


def test_nothing_accepted_is_lost() -> None:
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1


def test_priority_lists_use_kombus_separator_and_ten_levels() -> None:
    from kombu.transport.redis import Channel

    options = app.conf.broker_transport_options
    assert options["sep"] == PRIORITY_SEP == Channel.sep  # a default client's lists
    assert set(Channel.priority_steps) <= set(options["priority_steps"])
    assert options["priority_steps"] == list(range(10))
    assert options["queue_order_strategy"] == "priority"
    assert app.conf.task_default_priority is None  # the router sets every priority


def test_visibility_timeout_exceeds_the_longest_task() -> None:
    config = get_config()
    visibility = app.conf.broker_transport_options["visibility_timeout"]
    assert visibility > config.longest_task_s
    assert visibility > config.request_timeout and visibility > config.scheduler.timeout_seconds
    slow = replace(CoreModuleConfig(), request_timeout=7200)
    assert celery_settings(slow)["broker_transport_options"]["visibility_timeout"] > 7200


def test_a_purge_knows_the_queues_of_the_config_from_the_connection() -> None:
    """`celery purge` of the diffusion pool also empties its models' and workers' own
    queues: the broker options carry their names (`transport.purge_options`)."""
    from omni_tasks.config.registry import ModelEntry
    from omni_tasks.tasks.transport import PURGE_OPTION

    config = replace(CoreModuleConfig(), key_prefix="mine", models={"flux-b": ModelEntry()})
    options = celery_settings(config)["broker_transport_options"][PURGE_OPTION]
    assert options["queue"] == config.diffusion.queue
    assert "diffusion.flux-b" in options["models"]
    assert options["own_prefix"] == "mine.w."
    json.dumps(options)  # a connection's info stays JSON (Flower, `inspect stats`)


def test_worker_processes_import_the_worker_side() -> None:
    assert "workers.entry" in app.conf.imports
    assert app.conf.worker_consumer == "workers.lifecycle.consumer:OmniConsumer"


def test_task_names_are_unchanged() -> None:
    registered = {name for name in app.tasks if name.startswith("omni_tasks.")}
    assert registered == TASK_NAMES


def test_one_queue_per_pool_with_its_own_exchange_and_ten_priorities() -> None:
    config = get_config()
    queues = {q.name: q for q in app.conf.task_queues}
    assert set(queues) == {config.ar.queue, config.diffusion.queue, config.speech.queue}
    for name, queue in queues.items():
        assert queue.exchange.name == name and queue.exchange.type == "direct"
        assert queue.routing_key == name
        assert queue.queue_arguments == {"x-max-priority": 10}
    assert app.conf.task_default_queue == config.ar.queue


def test_the_app_reads_the_process_config() -> None:
    config = get_config()
    assert app.conf.broker_url == config.broker == config.redis_url
    assert app.conf.result_backend == config.redis_url
    assert app.conf.result_expires == config.result_expires
    assert app.conf.result_extended is True and app.conf.worker_send_task_events is True


def test_settings_for_a_worker_process_add_its_pool_settings() -> None:
    config = get_config()
    argv = ["celery", "-A", "omni_tasks", "worker", "-Q", config.diffusion.queue]
    worker = settings_for_process(config, argv)
    assert worker["worker_pool"] == config.diffusion.pool_type
    assert worker["worker_concurrency"] == config.diffusion.concurrency
    assert worker["worker_prefetch_multiplier"] == config.diffusion.prefetch_multiplier
    application = settings_for_process(config, ["python", "app.py"])
    assert "worker_pool" not in application and "worker_concurrency" not in application
    assert set(application) == set(celery_settings(config))  # the config's settings only


AMQP_URL = "amqp://guest:secret@rabbit:5672//"


def test_an_amqp_broker_gets_none_of_the_redis_only_options() -> None:
    config = replace(CoreModuleConfig(), broker_url=AMQP_URL)
    settings = celery_settings(config)
    assert settings["broker_url"] == AMQP_URL
    assert settings["result_backend"] == config.redis_url  # results stay in Redis
    assert settings["broker_transport_options"] == {"confirm_publish": True}
    assert settings["worker_cancel_long_running_tasks_on_connection_loss"] is True
    assert settings["task_acks_late"] is True and settings["task_reject_on_worker_lost"] is True
    redis_options = celery_settings(CoreModuleConfig())["broker_transport_options"]
    assert {"priority_steps", "sep", "queue_order_strategy", "visibility_timeout"} <= set(
        redis_options
    )
    assert "worker_cancel_long_running_tasks_on_connection_loss" not in celery_settings(
        CoreModuleConfig()
    )


def test_levels_become_amqp_priorities_and_back() -> None:
    # Level 0 is served first everywhere; RabbitMQ serves the highest number first.
    assert [amqp_priority(level) for level in (0, 4, 9)] == [9, 5, 0]
    assert amqp_priority(None) == 9  # no priority: the top level, as on Redis
    assert all(delivered_level(amqp_priority(lv), False) == lv for lv in range(10))
    assert delivered_level(3, True) == 3 and delivered_level(None, False) is None
    assert isinstance(app.amqp, OmniAMQP)


def test_the_result_backend_stores_states_as_celery_does(redis_client) -> None:
    """One round trip per state (`store_result.lua`), with Celery's rules: a success is
    never replaced, failures keep their own time to live, and a caller reads them back."""
    backend = app.backend
    assert type(backend).__name__.startswith("Omni")
    task_id = "test-backend-store"
    key = backend.get_key_for_task(task_id).decode()
    try:
        backend.store_result(task_id, {"step": 1}, "PROGRESS")
        assert backend.get_task_meta(task_id)["result"] == {"step": 1}
        backend.store_result(task_id, {"text": "done"}, "SUCCESS")
        backend.store_result(task_id, None, "REVOKED")  # too late: the success stands
        stored = json.loads(redis_client.get(key))
        assert stored["status"] == "SUCCESS" and stored["result"] == {"text": "done"}
        assert 0 < redis_client.ttl(key) <= backend.expires
    finally:
        redis_client.delete(key)
