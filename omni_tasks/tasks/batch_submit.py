"""Batch submission: N validated requests accepted in one step, all or nothing.

`submit_many` sends each request as its task's message, exactly as `.delay()` would
(Celery builds it, the router routes it, the transport envelopes it: the same headers,
`kwargsrepr`, deadline and ledger entry), but accepts the whole batch at once. With the
default broker (the coordination Redis) the envelopes are taken from the transport
instead of being sent, and one script (`scripts/admit_many.lua`) checks every id,
admits all of them, records them in the ledger and publishes them, in one round trip;
the `task-sent` events Flower shows follow in one pipeline. With another broker the
batch is accepted in one round trip first, then published on one producer (one
pipeline on Redis), and a failed publish gives the whole acceptance back.

A batch is refused as a whole: a request id accepted before for another request, or
given twice in the batch for two different requests (`RequestConflictError`), or a pool
that cannot take all of its requests (`QueueFullError`) enqueue nothing. A repeat (an
id accepted before for the same request) is not published again: its result is
returned, with `repeat` set, as from `.delay()`.

MULTIMODAL requests are two-stage chains and are refused (`RequestValidationError`,
field `request_type`): send them with `submit`, one at a time.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import redis
from celery.result import AsyncResult, GroupResult
from vine import barrier

from omni_tasks.coordination import acceptance, admission, client
from omni_tasks.coordination.client import redacted
from omni_tasks.errors import BrokerUnavailableError, RequestConflictError, RequestValidationError
from omni_tasks.requests import OmniRequest
from omni_tasks.tasks import sending
from omni_tasks.tasks.base import OmniTask
from omni_tasks.tasks.celery_app import app
from omni_tasks.tasks.definitions import TASK_FOR_TYPE
from omni_tasks.tasks.transport import accepts_on_publish

log = logging.getLogger(__name__)

#: The most requests one batch takes: its accepting script holds Redis while it runs,
#: about 45 us a request (a batch of 1000 holds it about 45 ms). Split larger ones.
MAX_BATCH = 1000


@dataclass
class Item:
    """One request of a batch: its task, message (kwargs), publish options and
    acceptance; `envelope` is the (list, JSON) the transport built for it."""

    task: OmniTask
    request: OmniRequest
    kwargs: dict[str, Any]
    options: dict[str, Any]
    accepting: acceptance.Acceptance
    envelope: tuple[str, str] | None = None
    result: AsyncResult | None = None


@dataclass
class Collected(acceptance.Acceptance):
    """An acceptance that keeps the message its publish hands over, instead of running
    the accepting step: the batch accepts all of them at once."""

    envelope: tuple[str, str] | None = None

    def accept(self, message: tuple[str, str] | None = None) -> admission.Admission:
        if message is None or self.envelope is not None:
            raise RuntimeError(f"request {self.admission_id}: one message per request")
        self.envelope = message
        return admission.Admission(self.queue, self.admission_id, added=False)

    def stash(self, message: tuple[str, str]) -> None:
        """The transport's hand-over of the message (`Acceptance.stash`): kept."""
        self.accept(message)


@dataclass
class SentEvents:
    """Stands in for Celery's event dispatcher while the messages are built: keeps each
    `task-sent` event, published once the batch is accepted."""

    events: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    def publish(self, type: str, fields: dict[str, Any], producer: Any, **kwargs: Any) -> None:
        self.events.append((type, dict(fields), kwargs))


class BatchResult(GroupResult):
    """Celery's `GroupResult`, which subscribes to its results when it is first waited
    on, as a sent request does (`result_backend.SubscribeOnWait`), not when it is made:
    a caller that never waits here (a batch API answering with ids) subscribes to none.

    Its ready barrier counts results that are ready as it is made: once this process's
    subscriber is open, each request is subscribed to as it is sent, and a result that
    comes before anybody waits here is read off the subscriber (by a wait on another
    result) and kept by Celery, so the barrier finds it ready at once. vine's
    `barrier(results)` never fires when every result is: each one counts while the
    barrier is not yet finalized, and the barrier marks itself finalized without
    checking its count, so `finalize()` is then a no-op and a wait runs to its timeout.
    """

    def __init__(self, id: str, results: list[AsyncResult], **kwargs: Any) -> None:
        super().__init__(id, [], **kwargs)
        self.results = results
        self._armed = False

    def _arm(self) -> None:
        if not self._armed:
            self._armed = True
            ready = barrier()
            for result in self.results:
                ready.add(result)  # subscribes to it, or counts it when ready
            self._set_ready_barrier(ready)
            ready.finalize()  # fires now when every result is ready

    def iter_native(self, *args: Any, **kwargs: Any) -> Any:
        self._arm()
        return super().iter_native(*args, **kwargs)

    def then(self, *args: Any, **kwargs: Any) -> Any:
        self._arm()
        return super().then(*args, **kwargs)


def submit_many(
    requests: Sequence[OmniRequest], *, task: OmniTask | str | None = None, **options: Any
) -> GroupResult:
    """Enqueue validated requests in one accepting step, all or nothing.

    Each request keeps its id (the result's id), its route (queue and priority level, as
    the router resolves them), its deadline (`expires`) and its idempotency. `options`
    are Celery publish options for every message. `task` sends every request as that
    task (its request type must match: `omni_tasks.probe` for TEXT requests measures the
    queue path); by default each goes to its type's task (`TASK_FOR_TYPE`). At most
    `MAX_BATCH` requests. Returns a `GroupResult` (not saved in the backend) whose
    `results` follow `requests`.
    """
    items, results = prepare(requests, task, options)
    if app.conf.task_always_eager:
        for item in items:
            item.result = item.task.send(item.request, None, item.request.request_id, dict(options))
    elif items and accepts_on_publish(app.omni.config):
        accept_and_publish(items)
    elif items:
        accept_then_publish(items)
    found = {item.request.request_id: item.result for item in items}
    return BatchResult(str(uuid.uuid4()), [found[i] for i in results], app=app)


def prepare(
    requests: Sequence[OmniRequest], task: OmniTask | str | None, options: dict[str, Any]
) -> tuple[list[Item], list[str]]:
    """Each distinct request's `Item`, and the request ids in order (a request given
    twice under one id is sent once)."""
    if len(requests) > MAX_BATCH:
        raise RequestValidationError(
            "requests", f"at most {MAX_BATCH} requests per batch, got {len(requests)}"
        )
    items: dict[str, Item] = {}
    order = []
    for index, request in enumerate(requests):
        if not isinstance(request, OmniRequest):
            raise RequestValidationError(
                f"requests.{index}", f"must be an OmniRequest, got {type(request).__name__}"
            )
        known = items.get(request.request_id)
        if known is None:
            items[request.request_id] = item_for(request, task_for(request, task), options)
        elif known.request.fingerprint() != request.fingerprint():
            raise RequestConflictError(
                request.request_id, "given twice in the batch, for two different requests"
            )
        order.append(request.request_id)
    return list(items.values()), order


def task_for(request: OmniRequest, task: OmniTask | str | None) -> OmniTask:
    """The task that sends `request`: `task`, else its type's."""
    named = TASK_FOR_TYPE[request.request_type] if task is None else task
    # The task itself, not the proxy a task decorator returns.
    chosen = app.tasks.get(named if isinstance(named, str) else getattr(named, "name", ""))
    if not isinstance(chosen, OmniTask):
        raise RequestValidationError("task", f"{named!r} is not an omni-tasks task")
    if type(chosen).send is not OmniTask.send or chosen.takes_previous_result:
        raise RequestValidationError(
            "request_type",
            f"{request.request_type.value} requests ({chosen.name}) are sent as more than "
            "one message: send them one at a time with omni_tasks.submit",
        )
    return chosen


def item_for(request: OmniRequest, task: OmniTask, options: dict[str, Any]) -> Item:
    """What the send path prepares for one request (`sending.accepting`): the message
    validated again as the task's (as `submit` does), its publish options and its
    acceptance."""
    task_id = request.request_id
    built = task.build_request(request.to_message(), task_id)
    if built.request_type is not request.request_type:
        raise RequestValidationError(
            "request_type", f"{task.name} does not take {request.request_type.value} requests"
        )
    opts = dict(options)
    kwargs = sending.publish_options(built, opts, task.omni_context.config)
    accepting = sending.accepting(task, None, kwargs, task_id, opts, built)
    return Item(task, built, kwargs, opts, accepting)


def accept_and_publish(items: list[Item]) -> None:
    """The default broker: take each message from the transport, then accept and
    publish them all in one step; the `task-sent` events follow."""
    events = SentEvents()
    try:
        client.check_reachable(items[0].accepting.config.redis_url)
        with app.producer_or_acquire() as producer:
            for item in items:
                collected = Collected(**vars(item.accepting))
                with acceptance.holding(collected):
                    item.result = publish(item, producer, event_dispatcher=events)
                if collected.envelope is None:
                    raise RuntimeError(f"request {item.accepting.admission_id}: no message")
                item.envelope = collected.envelope
    except acceptance.UNREACHABLE as exc:
        raise unavailable(items, exc, attempted=False) from exc
    admitted = accept(items, with_messages=True)
    settle(items, admitted)
    send_events(events)


def accept_then_publish(items: list[Item]) -> None:
    """Another broker: accept all (one round trip), then publish all on one producer
    (one pipeline on a Redis broker); a failed publish gives the acceptance back."""
    admitted = accept(items, with_messages=False)
    settle(items, admitted)
    try:
        with app.producer_or_acquire() as producer, batched(producer):
            for item, done in zip(items, admitted, strict=True):
                if not done.repeat:
                    with acceptance.holding(replace(item.accepting, outcome=done)):
                        item.result = publish(item, producer)
    except BaseException as exc:
        undone = undo(items, admitted)
        if isinstance(exc, acceptance.UNREACHABLE):
            raise unavailable(items, exc, attempted=not undone) from exc
        raise


def publish(item: Item, producer: Any, **extra: Any) -> AsyncResult:
    """The send path's publish of one message (`sending.publish`), on `producer`."""
    options = {**item.options, "producer": producer, **extra}
    return sending.publish(item.task, None, item.kwargs, item.request.request_id, options)


def accept(items: list[Item], *, with_messages: bool) -> list[admission.Admission]:
    """The batch's accepting step (`admission.admit_many`)."""
    batch = [
        admission.Asked(
            a.queue,
            a.admission_id,
            a.enforce,
            a.counted,
            a.entry,
            a.fingerprint,
            item.envelope if with_messages else None,
        )
        for item in items
        for a in (item.accepting,)
    ]
    first = items[0].accepting
    try:
        return admission.admit_many(first.client, first.config, batch)
    except acceptance.UNREACHABLE as exc:
        raise unavailable(items, exc, attempted=not acceptance.refused_at_connect(exc)) from exc


def settle(items: list[Item], admitted: list[admission.Admission]) -> None:
    """Each request's acceptance holds its outcome; a repeat's result is the id's."""
    for item, done in zip(items, admitted, strict=True):
        item.accepting.attempted = True
        item.accepting.outcome = done
        if done.repeat:
            item.result = item.task.repeat_result(done.admission_id)


def send_events(events: SentEvents) -> None:
    """The `task-sent` events of the accepted messages, in one pipeline; a failure is
    logged (the requests are accepted and queued)."""
    dispatcher = app.events.Dispatcher(enabled=False)
    try:
        with app.producer_or_acquire() as producer, batched(producer):
            for kind, fields, kwargs in events.events:
                dispatcher.publish(kind, fields, producer, **kwargs)
    except acceptance.UNREACHABLE:
        log.warning("task-sent events of %d requests not sent", len(events.events), exc_info=True)


@contextmanager
def batched(producer: Any) -> Iterator[None]:
    """kombu's publish batch (one pipeline on Redis) where the producer has one."""
    if not hasattr(producer, "batch"):
        yield
        return
    with producer.batch():
        yield


def undo(items: list[Item], admitted: list[admission.Admission]) -> bool:
    """Give back what the batch's acceptance took; whether that worked."""
    first = items[0].accepting
    try:
        admission.undo_many(first.client, first.config.pool_queues(), admitted)
    except acceptance.UNREACHABLE:
        return False
    return True


def unavailable(items: list[Item], exc: BaseException, *, attempted: bool) -> Exception:
    """The error of a batch that could not reach Redis or the broker."""
    config = items[0].accepting.config
    client.failed(config.redis_url)
    first = items[0].request.request_id
    url = redacted(config.redis_url if isinstance(exc, redis.RedisError) else config.broker)
    if attempted:
        outcome = (
            "it may have been accepted: send the same batch again, which runs each at most once"
        )
    else:
        outcome = "nothing was accepted and nothing will run"
    message = (
        f"batch of {len(items)} requests ({first}, ...) not sent: cannot reach {url} "
        f"({exc}); {outcome}"
    )
    return BrokerUnavailableError(first, message, attempted)
