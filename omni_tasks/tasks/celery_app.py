"""The Celery app: JSON only, priority queues (Redis lists, or RabbitMQ when
`broker_url` names one), late acks, events for Flower.

Priorities are levels 0..9, 0 highest, everywhere in omni-tasks, as kombu's Redis
transport reads them; RabbitMQ serves the highest number first, so `OmniAMQP` turns a
level into `9 - level` as it publishes to an AMQP broker.

A worker process (`celery -A omni_tasks worker`) also imports `WORKER_MODULES` before
`worker_init`: that is how the worker side (`workers.entry`) is loaded, and only
there. An application process never imports it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.app import backends
from celery.app.amqp import AMQP
from celery.backends.redis import RedisBackend
from kombu import Exchange, Queue

from omni_tasks.config import CoreModuleConfig, get_config
from omni_tasks.config.schema import is_sentinel_url
from omni_tasks.coordination import acceptance
from omni_tasks.coordination.client import CONNECT_TIMEOUT_S, with_tls_defaults
from omni_tasks.coordination.keys import PRIORITY_SEP, PRIORITY_STEPS
from omni_tasks.tasks import sending, transport
from omni_tasks.tasks.base import OmniTask
from omni_tasks.tasks.context import ProducerContext
from omni_tasks.tasks.result_backend import omni_result_backend
from omni_tasks.tasks.worker_settings import queues_from_argv, worker_settings

TASK_MODULES = ["omni_tasks.tasks.definitions"]
#: The router (`router.OmniRouter`), named for Celery to load on the first send.
ROUTER = "omni_tasks.tasks.router.app_router"
RESULT_WRITE_RETRIES = 40
#: Imported by Celery in worker processes only (the `imports` setting).
WORKER_MODULES = ["workers.entry"]


def pool_queue(name: str) -> Queue:
    """A queue with its own direct exchange: pools never share a binding."""
    return Queue(
        name,
        Exchange(name, type="direct"),
        routing_key=name,
        queue_arguments={"x-max-priority": TOP_LEVEL + 1},
    )


#: The top priority level; RabbitMQ queues are declared with `x-max-priority` above it.
TOP_LEVEL = max(PRIORITY_STEPS)


def routed_queue(name: str) -> str:
    """`name`, known to the app as a pool queue (`pool_queue`) from the first message
    routed to it (a model's queue, a worker's own queue). Celery would declare a queue
    it does not know without `x-max-priority`, which RabbitMQ refuses for a queue a
    worker declared with it."""
    queues = app.amqp.queues
    if name not in queues:  # `in` never creates it (indexing would)
        queues.add(pool_queue(name))
    return name


def amqp_priority(level: int | None) -> int:
    """The AMQP priority of a level (0 highest); no level is the top one, as on Redis."""
    return TOP_LEVEL - max(0, min(TOP_LEVEL, level or 0))


def delivered_level(priority: int | None, broker_is_redis: bool) -> int | None:
    """The level (0 highest) of a message from the priority its broker delivered it at."""
    if priority is None or broker_is_redis:
        return priority
    return amqp_priority(priority)


class OmniAMQP(AMQP):
    """Celery's message layer, with levels published as AMQP priorities to AMQP brokers,
    and `kwargsrepr` in the headers only."""

    Connection = transport.OmniConnection

    def _create_task_sender(self) -> Callable[..., Any]:
        send = super()._create_task_sender()

        def send_task_message(producer: Any, name: str, message: Any, **kwargs: Any) -> Any:
            # Celery passes every option on as a message property: `kwargsrepr` would
            # travel twice (it is in the headers, where Flower reads it).
            kwargs.pop("kwargsrepr", None)
            if producer.connection.transport.driver_type == "amqp":
                kwargs["priority"] = amqp_priority(kwargs.get("priority"))
            return send(producer, name, message, **kwargs)

        return send_task_message


def broker_settings(config: CoreModuleConfig) -> dict[str, Any]:
    """What depends on the broker: Redis priority lists and visibility timeout, or
    RabbitMQ's publisher confirms and redelivery on connection loss."""
    if not config.broker_is_redis:
        return {
            "broker_url": config.broker,
            # A publish returns once RabbitMQ has the message.
            "broker_transport_options": {"confirm_publish": True},
            # RabbitMQ requeues a lost connection's unacked messages at once: stop
            # running them here, as another worker gets them.
            "worker_cancel_long_running_tasks_on_connection_loss": True,
        }
    url = with_tls_defaults(config.broker)
    return {
        "broker_url": url,
        # kombu's Redis (or Sentinel) transport, with a Redis client kept per channel
        # (`transport`).
        "broker_transport": transport.kept_transport(url),
        "broker_transport_options": {
            "priority_steps": list(PRIORITY_STEPS),
            "sep": PRIORITY_SEP,
            "queue_order_strategy": "priority",
            # Unacked messages come back after this; it must exceed the longest task.
            "visibility_timeout": 2 * config.longest_task_s + 300,
            # A broker that does not answer fails a connection, never hangs it.
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            **transport.purge_options(config),
            **sentinel_options(config, url),
        },
    }


def sentinel_options(config: CoreModuleConfig, url: str) -> dict[str, Any]:
    """kombu's and Celery's Sentinel options where `url` names Sentinels: the master's
    name, and timeouts for the Sentinels' own connections (Celery's backend would give
    them none, so an unreachable Sentinel would hang a reconnect)."""
    if not is_sentinel_url(url):
        return {}
    timeouts = {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_timeout": CONNECT_TIMEOUT_S}
    return {"master_name": config.redis_sentinel_master, "sentinel_kwargs": timeouts}


def celery_settings(config: CoreModuleConfig) -> dict[str, Any]:
    """Celery settings derived from the omni-tasks config."""
    return {
        **broker_settings(config),
        "result_backend": with_tls_defaults(config.redis_url),
        # Celery's Sentinel result backend where `redis_url` names Sentinels.
        "result_backend_transport_options": sentinel_options(config, config.redis_url),
        # JSON only on the wire: a pickled message is refused by the worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Nothing accepted is lost: ack after the run; a dead worker's task comes back
        # (capped by max_redeliveries in the task base); reserve one message per slot.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        "task_queues": [pool_queue(queue) for queue in config.pool_queues()],
        "task_default_queue": config.ar.queue,
        "task_routes": (ROUTER,),
        "task_default_priority": None,
        # Flower sees every task and worker.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # STARTED is written by the worker once a delivery holds its request's one run
        # (`workers.handlers`), never by a duplicate or a conflicting message.
        "task_track_started": False,
        "result_extended": True,
        "result_expires": config.result_expires,
        # A result write that meets a Redis restart waits for Redis (backoff up to 10 s,
        # a few minutes in all) instead of failing: the message, acked after the write,
        # would otherwise be gone with no result.
        "result_backend_always_retry": True,
        "result_backend_max_retries": RESULT_WRITE_RETRIES,
        "imports": WORKER_MODULES,
        "worker_consumer": "workers.lifecycle.consumer:OmniConsumer",
    }


def settings_for_process(
    config: CoreModuleConfig | None = None, argv: list[str] | None = None
) -> dict[str, Any]:
    """All Celery settings of this process: the config's, plus per-pool worker defaults."""
    config = config or get_config()
    settings = celery_settings(config)
    queues = queues_from_argv(sys.argv if argv is None else argv)
    if queues is not None:
        settings.update(worker_settings(config, queues))
    return settings


# The settings are read lazily (Celery imports `omni_tasks.tasks.celeryconfig` on first use of
# `app.conf`), so a process can set OMNI_* variables after importing omni_tasks.
class OmniCelery(Celery):
    """Celery, with a message sent by task name admitted like `.delay()`: `send_task`
    bypasses `OmniTask.apply_async`, and the `before_task_publish` signal cannot refuse
    a publish (Celery logs and swallows what its receivers raise). Its Redis result
    backend subscribes to a result when a caller waits for it, and stores a state in
    one round trip (`result_backend`). It carries the producer side's context (`omni`):
    the config and the Redis client its tasks send with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.omni = ProducerContext()

    def send_task(self, name: str, *args: Any, **options: Any) -> Any:
        """An omni-tasks task's message goes through the send path
        (`sending.send_by_name`), unless a send there is publishing it now."""
        task = self.tasks.get(name)
        if acceptance.in_send() or not isinstance(task, OmniTask):
            return super().send_task(name, *args, **options)
        return sending.send_by_name(task, super().send_task, name, *args, **options)

    def _get_backend(self) -> Any:
        backend, url = backends.by_url(self.backend_cls or self.conf.result_backend, self.loader)
        if isinstance(backend, type) and issubclass(backend, RedisBackend):
            backend = omni_result_backend(backend)
        return backend(app=self, url=url)


app = OmniCelery("omni_tasks", include=TASK_MODULES, amqp=OmniAMQP)
app.config_from_object("omni_tasks.tasks.celeryconfig")
