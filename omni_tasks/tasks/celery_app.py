"""The Celery app: JSON only, Redis priority queues, late acks, events for Flower.

A worker process (`celery -A omni_tasks worker`) also imports `WORKER_MODULES` before
`worker_init`: that is how the worker side (`workers.lifecycle`) is loaded, and only
there. An application process never imports it.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from omni_tasks.config import CoreModuleConfig, get_config
from omni_tasks.coordination.keys import PRIORITY_SEP, PRIORITY_STEPS
from omni_tasks.tasks.worker_settings import queues_from_argv, worker_settings

TASK_MODULES = ["omni_tasks.tasks.definitions"]
#: Imported by Celery in worker processes only (the `imports` setting).
WORKER_MODULES = ["workers.lifecycle"]


def pool_queue(name: str) -> Queue:
    """A queue with its own direct exchange: pools never share a binding."""
    return Queue(
        name,
        Exchange(name, type="direct"),
        routing_key=name,
        queue_arguments={"x-max-priority": 10},
    )


def celery_settings(config: CoreModuleConfig) -> dict[str, Any]:
    """Celery settings derived from the omni-tasks config."""
    from omni_tasks.tasks.router import OmniRouter

    longest = config.longest_task_s
    return {
        "broker_url": config.redis_url,
        "result_backend": config.redis_url,
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
        "broker_transport_options": {
            "priority_steps": list(PRIORITY_STEPS),
            "sep": PRIORITY_SEP,
            "queue_order_strategy": "priority",
            # Unacked messages come back after this; it must exceed the longest task.
            "visibility_timeout": 2 * longest + 300,
        },
        "broker_connection_retry_on_startup": True,
        "task_queues": [pool_queue(config.ar.queue), pool_queue(config.diffusion.queue)],
        "task_default_queue": config.ar.queue,
        "task_routes": (OmniRouter(),),
        "task_default_priority": None,
        # Flower sees every task and worker.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "result_extended": True,
        "result_expires": config.result_expires,
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
app = Celery("omni_tasks", include=TASK_MODULES)
app.config_from_object("omni_tasks.tasks.celeryconfig")
