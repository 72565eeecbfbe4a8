"""Worker lifecycle, on Celery's signals: take the worker's identity and load its engines
before it reports ready, beat a heartbeat into Redis, run the reaper, and on SIGTERM
abort in-flight requests so their messages go back to the queue.

Connected when Celery imports `workers.entry` in a worker process (the app's
`imports` setting); never in an application process.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any

from celery import signals, states

from omni_tasks.config import CoreModuleConfig, get_config
from omni_tasks.coordination import admission, colon_layout, keys
from omni_tasks.coordination.counters import count_outcome
from omni_tasks.tasks.base import OmniTask
from omni_tasks.tasks.celery_app import app, pool_queue
from workers.lifecycle.heartbeat import Heartbeat
from workers.lifecycle.reaper import Reaper
from workers.runtime import WorkerIdentity, runtime

log = logging.getLogger(__name__)
heartbeat = Heartbeat(runtime)
reaper = Reaper(app, runtime)
releases = admission.ReleaseBatch(
    lambda ids: admission.release(runtime.redis, runtime.config.pool_queues(), ids)
)


def identity_of(worker: Any, config: CoreModuleConfig) -> WorkerIdentity:
    """The identity of a Celery `WorkController` (at `worker_init`) under `config`."""
    queues = sorted(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
    pool_cls = worker.pool_cls
    pool_type = getattr(pool_cls, "__module__", str(pool_cls)).rsplit(".", 1)[-1]
    return WorkerIdentity(
        hostname=worker.hostname,
        queues=queues,
        stages=config.stages_for(queues),
        pool_type=pool_type,
        concurrency=int(worker.concurrency or 0),
    )


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Celery's start of a worker, an entry point: the process config (set by the CLI
    or the app) becomes the runtime's, which everything after it reads."""
    config = get_config()  # the worker's config, from here on the runtime's
    runtime.attach(identity_of(sender, config), config)
    if runtime.identity.pool_type != "prefork":  # prefork: each child loads its own
        _load_engines()


@signals.celeryd_after_setup.connect
def _on_after_setup(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """A diffusion worker also consumes its model's queue and its own queue
    (cache-affinity routing); see `consumed_queues`."""
    queues = instance.app.amqp.queues
    for queue in consumed_queues(queues):
        queues.select_add(queue)
    identity = runtime.identity
    runtime.attach(replace(identity, queues=sorted(queues.consume_from)))


def consumed_queues(queues: Any) -> list[Any]:
    """The queues a worker reads beside its `-Q` ones: for a diffusion worker, its
    model's queue (`keys.model_queue`: requests naming the model it serves) and its own
    queue. The selection is fixed first: a worker started without `-Q` reads every
    queue the app knows, and routing adds queues (other models') it must never read."""
    queues.select(list(queues.consume_from))
    if "dit" not in runtime.identity.stages:
        return []
    dit = runtime.config.diffusion
    names = (keys.model_queue(dit.queue, dit.model), runtime.keys.worker_queue(runtime.hostname))
    return [pool_queue(name) for name in names]


@signals.worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    _load_engines()


def _load_engines() -> None:
    started = time.perf_counter()
    runtime.start()
    identity = runtime.identity
    log.warning(
        "omni-tasks worker %s serving %s (stages %s) ready in %.1fs",
        identity.hostname,
        identity.queues,
        identity.stages,
        time.perf_counter() - started,
    )


@signals.worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    _convert_colon_layout()
    _load_revocations()
    heartbeat.start()
    reaper.start()


def _convert_colon_layout() -> None:
    if not runtime.config.broker_is_redis:
        return
    try:
        colon_layout.convert(runtime.redis, runtime.identity.queues)
    except Exception:
        log.warning("could not convert an older Redis layout", exc_info=True)


def _load_revocations() -> None:
    """Requests cancelled while this worker was not running: Celery's in-memory revoked
    list only hears live broadcasts, so seed it from the flags kept in Redis."""
    from celery.worker import state as worker_state

    prefix = runtime.keys.revoked("")
    try:
        for key in runtime.redis.scan_iter(match=prefix + "*", count=1000):
            worker_state.revoked.add(key[len(prefix) :])
    except Exception:
        log.warning("could not load revocations from Redis", exc_info=True)


@signals.task_postrun.connect
def _on_task_postrun(
    task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any
) -> None:
    """A message ran: if its request ended, its pool's admission count drops."""
    if isinstance(task, OmniTask) and task_id:
        try:
            release_if_ended(task, task_id, task.request.chain, state)
        except Exception:
            log.warning("could not release the admission of %s", task_id, exc_info=True)


def release_if_ended(task: OmniTask, task_id: str, chain: Any, state: str | None) -> None:
    """Release the request's admission unless its message comes back (rejected to be
    requeued, retried), a later chain stage still runs, or it was replaced (ignored,
    with no final result yet); the reaper reconciles anything missed."""
    if state == states.SUCCESS and chain:
        return
    if state == states.IGNORED:
        if task.backend.get_task_meta(task_id).get("status") not in states.READY_STATES:
            return
    elif state not in states.READY_STATES:
        return
    releases.add({task_id, admission.final_task_id(task_id, {"chain": chain})})


@signals.task_revoked.connect
def _on_task_revoked(sender: Any = None, expired: bool = False, **kwargs: Any) -> None:
    """A message this worker discarded: past its `expires`, or cancelled."""
    if isinstance(sender, OmniTask):
        request = kwargs.get("request")
        task_id = getattr(request, "id", None)
        if task_id:
            chain = getattr(request, "chain", None)
            try:
                ids = {task_id, admission.final_task_id(task_id, {"chain": chain})}
                admission.release(runtime.redis, runtime.config.pool_queues(), ids)
            except Exception:
                log.warning("could not release the admission of %s", task_id, exc_info=True)
        try:
            outcome = "expired" if expired else "cancelled"
            count_outcome(runtime.redis, sender.stage_queue, outcome)
        except Exception:
            log.warning("could not count a revoked task", exc_info=True)


@signals.worker_shutting_down.connect
def _on_shutting_down(**_: Any) -> None:
    # Called inside a signal handler: do the work on a thread.
    threading.Thread(target=_stop_engines, name="omni-stop", daemon=True).start()


def _stop_engines() -> None:
    heartbeat.stop()
    reaper.stop()
    runtime.stop()


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    _stop_engines()
    runtime.counters.flush()
    releases.flush()
    heartbeat.clear()
