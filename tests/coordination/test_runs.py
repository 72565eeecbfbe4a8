"""One id, one run (`omni_tasks.coordination.runs`), on a real Redis: the claim script's
answers for each state a twin delivery can find."""

from __future__ import annotations

import json

from helpers import KEYS

from omni_tasks.config import get_config
from omni_tasks.coordination import runs
from omni_tasks.coordination.client import get_redis

RESULT_KEY = "celery-task-meta-run-1"
STARTED = json.dumps({"status": "STARTED", "result": {"pid": 1}, "task_id": "run-1"})
RESULT = (RESULT_KEY, STARTED, 60)
GRACE_S = 10


def beat(client, hostname: str, instance: str, held: tuple[str, ...] = ()) -> None:
    """A live worker, as its heartbeat says: its hash, and the task ids it holds."""
    client.hset(KEYS.worker(hostname), mapping={"instance": instance, "pid": 1})
    if held:
        client.sadd(KEYS.held(hostname), *held)


def claim_s() -> int:
    return runs.claim_ttl_s(get_config().longest_task_s)


def claim(value: str, taking_over: bool = False) -> str:
    return runs.claim(get_redis(), "run-1", value, RESULT, GRACE_S, claim_s(), taking_over)


def age_claim(client, seconds: int) -> None:
    """Make the claim of run-1 look `seconds` old (its age is read from its TTL)."""
    client.expire(KEYS.run_claim("run-1"), claim_s() - seconds)


def test_the_first_delivery_claims_the_run(redis_client) -> None:
    mine = runs.claim_value("w1@host", "i1")
    assert claim(mine) == "claimed"
    assert redis_client.get(KEYS.run_claim("run-1")) == mine
    assert 0 < redis_client.ttl(KEYS.run_claim("run-1")) <= claim_s()
    # Marked STARTED in the same step, with the result's time to live.
    assert redis_client.get(RESULT_KEY) == STARTED and 0 < redis_client.ttl(RESULT_KEY) <= 60


def test_a_twin_of_a_run_a_live_worker_holds_is_a_duplicate(redis_client) -> None:
    beat(redis_client, "w1@host", "i1")
    first = runs.claim_value("w1@host", "i1")
    assert claim(first) == "claimed"
    # Another worker, and a second thread of the same worker: both see it running.
    assert claim(runs.claim_value("w2@host", "i2")) == "running"
    assert claim(runs.claim_value("w1@host", "i1")) == "running"
    assert redis_client.get(KEYS.run_claim("run-1")) == first


def test_a_claim_its_live_worker_does_not_hold_is_taken_over_after_the_grace(
    redis_client,
) -> None:
    beat(redis_client, "w1@host", "i1")
    assert claim(runs.claim_value("w1@host", "i1")) == "claimed"
    age_claim(redis_client, GRACE_S - 2)  # young: w1's held set may not list it yet
    assert claim(runs.claim_value("w2@host", "i2")) == "running"
    beat(redis_client, "w1@host", "i1", held=("run-1",))
    age_claim(redis_client, GRACE_S + 5)  # listed by w1: still running
    assert claim(runs.claim_value("w2@host", "i2")) == "running"
    # w1 beats without it (it died in its run, or never ran it): as the reaper sees it.
    redis_client.delete(KEYS.held("w1@host"))
    taker = runs.claim_value("w2@host", "i2")
    assert claim(taker) == "claimed"
    assert redis_client.get(KEYS.run_claim("run-1")) == taker


def test_a_message_given_back_takes_a_live_looking_claim_over(redis_client) -> None:
    # The broker requeued it (its holder's connection is gone) or the reaper restored
    # it: whoever claimed it no longer holds it, however recently it beat.
    beat(redis_client, "w1@host", "i1", held=("run-1",))
    assert claim(runs.claim_value("w1@host", "i1")) == "claimed"
    back = runs.claim_value("w2@host", "i2")
    assert claim(back, taking_over=True) == "claimed"
    assert redis_client.get(KEYS.run_claim("run-1")) == back
    redis_client.set(RESULT_KEY, json.dumps({"status": "SUCCESS"}))  # but never after a success
    again = runs.claim_value("w3@host", "i3")
    assert claim(again, taking_over=True) == "done"


def test_a_dead_or_restarted_holder_gives_the_run_up(redis_client) -> None:
    assert claim(runs.claim_value("w1@host", "i1")) == "claimed"
    # w1 never beats (killed): a redelivery elsewhere takes the run over.
    taker = runs.claim_value("w2@host", "i2")
    assert claim(taker) == "claimed"
    # w2 restarts under the same hostname: a new instance, so the old claim is dead.
    beat(redis_client, "w2@host", "i3")
    assert claim(runs.claim_value("w2@host", "i3")) == "claimed"


def test_a_success_stored_under_the_id_leaves_nothing_to_run(redis_client) -> None:
    redis_client.set(RESULT_KEY, json.dumps({"status": "SUCCESS", "result": {}}))
    assert claim(runs.claim_value("w1@host", "i1")) == "done"
    assert not redis_client.exists(KEYS.run_claim("run-1"))
    for status in ("FAILURE", "STARTED", "PROGRESS"):  # not a success: it may run
        redis_client.set(RESULT_KEY, json.dumps({"status": status}))
        assert claim(runs.claim_value("w1@host", "i1")) == "claimed"
    redis_client.set(RESULT_KEY, "not json")
    assert claim(runs.claim_value("w1@host", "i1")) == "claimed"


def test_only_the_holder_releases_its_claim(redis_client) -> None:
    beat(redis_client, "w1@host", "i1")
    mine = runs.claim_value("w1@host", "i1")
    claim(mine)
    runs.release(get_redis(), "run-1", runs.claim_value("w1@host", "i1"))  # another run's claim
    assert redis_client.get(KEYS.run_claim("run-1")) == mine
    runs.release(get_redis(), "run-1", mine)
    assert not redis_client.exists(KEYS.run_claim("run-1"))
    assert claim(runs.claim_value("w2@host", "i2")) == "claimed"
