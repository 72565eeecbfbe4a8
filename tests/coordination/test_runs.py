"""One id, one run (`omni_tasks.coordination.runs`), on a real Redis: the claim script's
answers for each state a twin delivery can find."""

from __future__ import annotations

import json

from omni_tasks.coordination import keys, runs

RESULT_KEY = "celery-task-meta-run-1"


def beat(client, hostname: str, instance: str) -> None:
    """A live worker, as its heartbeat hash says."""
    client.hset(keys.worker(hostname), mapping={"instance": instance, "pid": 1})


def test_the_first_delivery_claims_the_run(redis_client) -> None:
    mine = runs.claim_value("w1@host", "i1")
    assert runs.claim("run-1", mine, RESULT_KEY) == "claimed"
    assert redis_client.get(keys.run_claim("run-1")) == mine
    assert 0 < redis_client.ttl(keys.run_claim("run-1")) <= runs.claim_ttl_s()


def test_a_twin_of_a_run_a_live_worker_holds_is_a_duplicate(redis_client) -> None:
    beat(redis_client, "w1@host", "i1")
    first = runs.claim_value("w1@host", "i1")
    assert runs.claim("run-1", first, RESULT_KEY) == "claimed"
    # Another worker, and a second thread of the same worker: both see it running.
    assert runs.claim("run-1", runs.claim_value("w2@host", "i2"), RESULT_KEY) == "running"
    assert runs.claim("run-1", runs.claim_value("w1@host", "i1"), RESULT_KEY) == "running"
    assert redis_client.get(keys.run_claim("run-1")) == first


def test_a_dead_or_restarted_holder_gives_the_run_up(redis_client) -> None:
    assert runs.claim("run-1", runs.claim_value("w1@host", "i1"), RESULT_KEY) == "claimed"
    # w1 never beats (killed): a redelivery elsewhere takes the run over.
    taker = runs.claim_value("w2@host", "i2")
    assert runs.claim("run-1", taker, RESULT_KEY) == "claimed"
    # w2 restarts under the same hostname: a new instance, so the old claim is dead.
    beat(redis_client, "w2@host", "i3")
    assert runs.claim("run-1", runs.claim_value("w2@host", "i3"), RESULT_KEY) == "claimed"


def test_a_success_stored_under_the_id_leaves_nothing_to_run(redis_client) -> None:
    redis_client.set(RESULT_KEY, json.dumps({"status": "SUCCESS", "result": {}}))
    assert runs.claim("run-1", runs.claim_value("w1@host", "i1"), RESULT_KEY) == "done"
    assert not redis_client.exists(keys.run_claim("run-1"))
    for status in ("FAILURE", "STARTED", "PROGRESS"):  # not a success: it may run
        redis_client.set(RESULT_KEY, json.dumps({"status": status}))
        assert runs.claim("run-1", runs.claim_value("w1@host", "i1"), RESULT_KEY) == "claimed"
    redis_client.set(RESULT_KEY, "not json")
    assert runs.claim("run-1", runs.claim_value("w1@host", "i1"), RESULT_KEY) == "claimed"


def test_only_the_holder_releases_its_claim(redis_client) -> None:
    beat(redis_client, "w1@host", "i1")
    mine = runs.claim_value("w1@host", "i1")
    runs.claim("run-1", mine, RESULT_KEY)
    runs.release("run-1", runs.claim_value("w1@host", "i1"))  # another run's claim
    assert redis_client.get(keys.run_claim("run-1")) == mine
    runs.release("run-1", mine)
    assert not redis_client.exists(keys.run_claim("run-1"))
    assert runs.claim("run-1", runs.claim_value("w2@host", "i2"), RESULT_KEY) == "claimed"
