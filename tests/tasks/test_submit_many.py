"""`submit_many`: a batch of requests accepted in one step, all or nothing, each message
the one `.delay()` sends (same route, deadline, headers and ledger entry), on a real
Redis; a real worker runs what it sent; a RabbitMQ broker gets it after acceptance."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import states
from helpers import DIT_QUEUE, KEYS, eventually, mixed_text_requests, queued_messages, where

from omni_tasks import (
    QueueFullError,
    RequestConflictError,
    RequestValidationError,
    create_diffusion_request,
    create_multimodal_request,
    create_text_request,
    generate_text,
    get_config,
    submit,
    submit_many,
)
from omni_tasks.coordination import admission, ledger
from omni_tasks.coordination.idempotency import ACCEPTED_HEADER
from omni_tasks.tasks import batch_submit
from omni_tasks.tasks.celery_app import app
from omni_tasks.tasks.sending import request_deadline

ROOT = Path(__file__).resolve().parents[2]
QUEUES = ("ar", "diffusion", DIT_QUEUE)
#: What differs between two publishes of one message: kombu's tag and the time left.
VOLATILE = ("delivery_tag", "expiration")


def all_messages(client: redis.Redis) -> list[dict[str, Any]]:
    return [m for q in QUEUES for _, m in queued_messages(client, q)]


def accepted_state(client: redis.Redis) -> dict[str, Any]:
    """Everything an acceptance writes: queues, ledger, fingerprints, admitted sets."""
    return {
        "messages": sorted(m["headers"]["id"] for m in all_messages(client)),
        "ledger": sorted(client.zrange(KEYS.ledger_open(), 0, -1)),
        "fingerprints": sorted(client.scan_iter(match=KEYS.request_fingerprint("*"))),
        "admitted": {q: sorted(client.zrange(KEYS.admitted(q), 0, -1)) for q in QUEUES[:2]},
    }


def without_volatile(message: dict[str, Any]) -> dict[str, Any]:
    properties = {k: v for k, v in message["properties"].items() if k not in VOLATILE}
    return {**message, "properties": properties}


def test_each_request_keeps_its_id_route_and_deadline(redis_client) -> None:
    requests = [
        *mixed_text_requests(6),
        create_diffusion_request("a fox", request_id="img-1", steps=4),
    ]
    group = submit_many(requests)
    assert [r.id for r in group.results] == [r.request_id for r in requests]
    assert not redis_client.exists(f"celery-taskset-meta-{group.id}")  # not saved
    levels = {"high": 0, "normal": 6, "low": 9}
    for request in requests:
        queue, level = where(redis_client, request.request_id)
        assert (queue, level) == (
            "ar" if request.prompt != "a fox" else DIT_QUEUE,
            levels[request.priority],
        )
    for message in all_messages(redis_client):
        request = next(r for r in requests if r.request_id == message["headers"]["id"])
        deadline = request_deadline(request, get_config().request_time_cap_s)
        expires = message["headers"]["expires"]
        if deadline is None:
            assert expires is None
        else:
            assert datetime.fromisoformat(expires).timestamp() == pytest.approx(deadline)
        assert message["headers"][ACCEPTED_HEADER] is True
    assert sorted(redis_client.zrange(KEYS.ledger_open(), 0, -1)) == sorted(
        r.request_id for r in requests
    )


@pytest.mark.parametrize("kind", ["text", "diffusion"])
def test_a_message_is_the_one_submit_sends(redis_client, kind: str) -> None:
    """Byte for byte, but for kombu's delivery tag and the milliseconds left to live:
    the envelope, the headers (the accepted mark, kwargsrepr), the ledger entry."""
    if kind == "text":
        request = create_text_request("same", request_id="same-1", timeout_s=60, priority="low")
    else:
        request = create_diffusion_request("same", request_id="same-1", steps=4, seed=3)

    def sent(send: Any) -> tuple[dict[str, Any], dict[str, Any], set[str]]:
        from conftest import clean_redis

        clean_redis()
        send()
        (message,) = all_messages(redis_client)
        entry = ledger.entry(redis_client, request.request_id)
        return without_volatile(message), entry, set(redis_client.keys("omni:*"))

    batch = sent(lambda: submit_many([request]))
    single = sent(lambda: submit(request))
    assert batch == single


def test_the_batch_is_accepted_in_one_round_trip(redis_client) -> None:
    submit_many(mixed_text_requests(2, "warm"))  # the script is loaded, Redis known to answer
    requests = mixed_text_requests(20)
    with commands_sent(redis_client) as seen:
        submit_many(requests)
    # Other tests' threads in this process (a lease renewal, say) may run commands
    # meanwhile: the scripts counted are those that name this batch's requests.
    scripts = [c for c in seen if c.startswith("EVALSHA")]
    ours = [c for c in scripts if re.search(r"\br-\d+\b", c)]
    assert len(ours) == 1, ours
    # The rest is the task-sent events Flower shows (one pipeline, after the script),
    # and, once this process waits on results, the result backend's SUBSCRIBEs and
    # UNSUBSCRIBEs (sent on its subscriber connection, no reply awaited).
    subscriber = ("SUBSCRIBE", "UNSUBSCRIBE")
    rest = [c.split()[0] for c in seen if c not in scripts]
    assert [c for c in rest if c not in subscriber] == ["PUBLISH"] * len(requests)
    assert len(all_messages(redis_client)) == len(requests) + 2


def test_a_full_pool_refuses_the_whole_batch(redis_client) -> None:
    first = submit_many(mixed_text_requests(3, "in"))
    before = accepted_state(redis_client)
    with admission.max_queue_size(6), pytest.raises(QueueFullError) as info:
        submit_many(mixed_text_requests(4, "over"))  # 3 + 4 > 6
    assert "the batch adds 4" in str(info.value) and "max_queue_size=6" in str(info.value)
    assert accepted_state(redis_client) == before
    with admission.max_queue_size(6):  # 3 + 3 fits; repeats of the first 3 take no place
        group = submit_many([*mixed_text_requests(3, "in"), *mixed_text_requests(3, "fits")])
    assert [getattr(r, "repeat", False) for r in group.results] == [True] * 3 + [False] * 3
    assert [r.id for r in first.results] == [r.id for r in group.results[:3]]


def test_a_conflict_refuses_the_whole_batch(redis_client) -> None:
    generate_text.delay(prompt="taken", request_id="taken-1")
    before = accepted_state(redis_client)
    other = create_text_request("something else", request_id="taken-1")
    with pytest.raises(RequestConflictError) as info:
        submit_many([*mixed_text_requests(3), other])
    assert info.value.request_id == "taken-1"
    assert accepted_state(redis_client) == before
    twice = [create_text_request("a", request_id="x"), create_text_request("b", request_id="x")]
    with pytest.raises(RequestConflictError, match="twice in the batch"):
        submit_many(twice)
    assert accepted_state(redis_client) == before


def test_repeats_return_their_results_without_publishing_again(redis_client) -> None:
    requests = mixed_text_requests(4)
    submit_many(requests)
    once = accepted_state(redis_client)
    again = submit_many([*requests, requests[0]])  # a request twice in one batch: sent once
    assert [r.id for r in again.results] == [r.request_id for r in [*requests, requests[0]]]
    assert all(getattr(r, "repeat", False) for r in again.results)
    assert accepted_state(redis_client) == once
    new = create_text_request("new", request_id="new-1")
    mixed_group = submit_many([requests[1], new])
    assert [getattr(r, "repeat", False) for r in mixed_group.results] == [True, False]
    assert len(all_messages(redis_client)) == 5


def test_multimodal_and_foreign_objects_are_refused(redis_client) -> None:
    before = accepted_state(redis_client)
    with pytest.raises(RequestValidationError) as info:
        submit_many([*mixed_text_requests(2), create_multimodal_request("a lighthouse")])
    assert info.value.field == "request_type" and "submit" in str(info.value)
    with pytest.raises(RequestValidationError) as info:
        submit_many([*mixed_text_requests(1), {"prompt": "a dict"}])  # type: ignore[list-item]
    assert info.value.field == "requests.1"
    with pytest.raises(RequestValidationError) as info:
        submit_many([create_diffusion_request("x")], task="omni_tasks.probe")
    assert info.value.field == "request_type"
    too_many = [create_text_request("x")] * (batch_submit.MAX_BATCH + 1)
    with pytest.raises(RequestValidationError) as info:
        submit_many(too_many)
    assert info.value.field == "requests"
    assert accepted_state(redis_client) == before
    assert submit_many([]).results == []


def test_with_another_broker_a_failed_publish_gives_the_acceptance_back(
    redis_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accept-first path (any broker but the coordination Redis), here on the same
    Redis: accepted in one round trip, published in one pipeline, undone on failure."""
    monkeypatch.setattr(batch_submit, "accepts_on_publish", lambda config: False)
    group = submit_many(mixed_text_requests(3))
    assert [where(redis_client, r.id)[1] for r in group.results] == [0, 6, 9]
    assert all(m["headers"][ACCEPTED_HEADER] for m in all_messages(redis_client))
    before = accepted_state(redis_client)
    published = batch_submit.publish
    calls: list[str] = []

    def failing(item: batch_submit.Item, producer: Any, **extra: Any) -> Any:
        calls.append(item.request.request_id)
        if len(calls) == 2:
            raise redis.ConnectionError("connection lost")
        return published(item, producer, **extra)

    monkeypatch.setattr(batch_submit, "publish", failing)
    with pytest.raises(Exception) as info:
        submit_many(mixed_text_requests(3, "lost"))
    assert "not sent" in str(info.value) and info.value.may_be_accepted is False
    assert accepted_state(redis_client) == before


def test_waiting_on_a_batch_whose_results_came_first_returns_them_at_once(redis_client) -> None:
    """Once this process's result subscriber is open (it waited on a result before), a
    batch's requests are subscribed to as they are sent: results stored before anybody
    waits on the batch are read off the subscriber while the caller waits on something
    else, and kept by Celery until asked for. Waiting on the batch then finds all of
    them there, and returns them at once (its ready barrier, made from results that
    are all ready, fires: the wait does not run to its timeout)."""
    backend = app.backend
    opener, later = (f"{name}-{time.monotonic_ns()}" for name in ("opener", "later"))
    backend.store_result(opener, {"request_id": opener}, states.SUCCESS)
    app.AsyncResult(opener).get(timeout=10)  # opens the subscriber, if no test did
    batch = submit_many(mixed_text_requests(4, "stored"), task="omni_tasks.probe")
    for result in batch.results:
        backend.store_result(result.id, {"request_id": result.id}, states.SUCCESS)
    # Another wait, which reads the batch's results off the subscriber first.
    store_later = threading.Timer(0.2, backend.store_result, (later, {}, states.SUCCESS))
    store_later.start()
    app.AsyncResult(later).get(timeout=10)
    started = time.monotonic()
    values = batch.get(timeout=5)
    assert time.monotonic() - started < 1
    assert [v["request_id"] for v in values] == [f"stored-{i}" for i in range(4)]


#: A producer with RabbitMQ as its broker (its own process: the broker is read once).
AMQP_PRODUCER = """
import json, sys
from omni_tasks import QueueFullError, create_text_request, submit_many
from omni_tasks.coordination import admission
reqs = [create_text_request(f"q {i}", request_id=f"amqp-{i}", priority=p)
        for i, p in enumerate(["low", "high", "normal"])]
ids = [r.id for r in submit_many(reqs).results]
with admission.max_queue_size(4):
    try:
        submit_many([create_text_request("x", request_id=f"full-{i}") for i in range(2)])
        full = False
    except QueueFullError:
        full = True
print(json.dumps({"ids": ids, "full": full}))
"""


@pytest.mark.slow
def test_a_rabbitmq_broker_gets_the_batch_after_its_acceptance(redis_client) -> None:
    from helpers import AMQP_URL, amqp_answers
    from kombu import Connection

    if not amqp_answers(AMQP_URL):
        pytest.skip(f"no RabbitMQ answers at {AMQP_URL}")
    queue = f"ar-batch-{os.getpid()}"
    env = {**os.environ, "OMNI_BROKER_URL": AMQP_URL, "OMNI_AR__QUEUE": queue}
    out = subprocess.run(
        [sys.executable, "-c", AMQP_PRODUCER],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"ids": ["amqp-0", "amqp-1", "amqp-2"], "full": True}
    got = []
    with Connection(AMQP_URL) as connection:
        channel = connection.channel()
        try:
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                got.append((message.headers["id"], message.properties.get("priority")))
        finally:
            channel.queue_delete(queue)
            channel.exchange_delete(queue)
    # RabbitMQ serves the highest number first: levels 0, 6, 9 are 9, 3, 0.
    assert got == [("amqp-1", 9), ("amqp-2", 3), ("amqp-0", 0)]
    assert sorted(redis_client.zrange(KEYS.admitted(queue), 0, -1)) == [
        "amqp-0",
        "amqp-1",
        "amqp-2",
    ]
    assert not redis_client.exists(KEYS.request_fingerprint("full-0"))


class commands_sent:  # noqa: N801 - used as a context manager, like a function
    """The commands this test's database received (MONITOR), but those a script ran."""

    def __init__(self, client: redis.Redis) -> None:
        # A client of its own: MONITOR holds its connection, which the sender's pool
        # would otherwise replace with a new one (its setup commands counted here).
        self.client = redis.Redis.from_url(os.environ["OMNI_REDIS_URL"], decode_responses=True)
        self.sender = client
        self.seen: list[str] = []
        self.db = client.connection_pool.connection_kwargs.get("db", 0)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._ready = threading.Event()

    def _watch(self) -> None:
        with self.client.monitor() as monitor:
            for command in monitor.listen():
                text = command["command"]
                if "omni-start-watching" in text:
                    self._ready.set()
                elif "omni-stop-watching" in text:
                    return
                elif self._ready.is_set() and command.get("db") == self.db:
                    if command.get("client_type") != "lua":
                        self.seen.append(text)

    def __enter__(self) -> list[str]:
        """Once MONITOR shows a marker the sender sent, it shows all it sends after."""
        self._thread.start()
        listening = eventually(
            lambda: self.sender.get("omni-start-watching") is None and self._ready.is_set(), 5
        )
        assert listening, "MONITOR never showed the start marker"
        return self.seen

    def __exit__(self, *exc: object) -> None:
        """MONITOR shows commands in the order Redis ran them: the marker comes last."""
        self.sender.get("omni-stop-watching")
        self._thread.join(10)
