"""The hot-path scripts' cheap paths (`admit.lua`, `claim_run.lua`) write what the
full checks wrote: a new request or run costs one SET NX where a GET and a SET were,
and the rare paths (a repeat, a full pool, a held claim, a success) leave Redis as
before."""

from __future__ import annotations

from helpers import KEYS

from omni_tasks.coordination.client import get_redis


def _admit(request_id: str, limit: int, fingerprint: str = "f") -> list[int]:
    """`admit.lua` with a ledger entry and a message for `request_id`, in pool 'ar'."""
    script_keys = [
        KEYS.admitted("ar"),
        KEYS.request_fingerprint(request_id),
        KEYS.ledger(request_id),
        KEYS.ledger_open(),
        "q",
    ]
    args = [request_id, limit, 100.0, fingerprint, 60, request_id, 60, "t", "[]", "{}", "{}"]
    return [int(v) for v in get_redis().scripts.admit(keys=script_keys, args=[*args, "msg"])]


def test_admit_new_repeat_conflict_and_full(redis_client) -> None:
    assert _admit("a", 2) == [1, 1]
    assert redis_client.get(KEYS.request_fingerprint("a")) == "f"
    assert redis_client.ttl(KEYS.request_fingerprint("a")) > 0
    assert _admit("a", 2) == [2, -1]  # the same request again: a repeat, nothing written
    assert _admit("a", 2, fingerprint="g") == [-2, -1]  # another one under its id
    assert redis_client.llen("q") == 1 and redis_client.zcard(KEYS.ledger_open()) == 1
    assert _admit("b", 2) == [1, 2]
    assert _admit("c", 2) == [-1, 2]  # full: no fingerprint, entry or message is left
    assert not redis_client.exists(KEYS.request_fingerprint("c"), KEYS.ledger("c"))
    assert redis_client.llen("q") == 2
    assert _admit("a", 2, fingerprint="") == [0, 2]  # already admitted: not refused
    assert redis_client.zscore(KEYS.admitted("ar"), "a") == 100.0  # its score kept
    assert _admit("d", 0, fingerprint="") == [1, -1]  # no limit: admitted, not counted
    assert _admit("e", -1, fingerprint="") == [0, -1]  # a later stage: not admitted
    assert redis_client.zcard(KEYS.admitted("ar")) == 3


def test_claim_run_after_a_success_leaves_no_claim(redis_client) -> None:
    claim, result = "run:y", "celery-task-meta-y"
    redis_client.set(result, '{"status": "SUCCESS"}')
    args = ["w1 i1 t1", 60, "omni-test:worker:", "omni-test:held:", 10, "y", 0, "{}", 60]
    assert get_redis().scripts.claim_run(keys=[claim, result], args=args) == "done"
    assert not redis_client.exists(claim)
    assert redis_client.get(result) == '{"status": "SUCCESS"}'


def test_claim_run_writes_the_claim_and_started(redis_client) -> None:
    claim, result = "run:z", "celery-task-meta-z"
    started = '{"status": "STARTED"}'
    args = ["w1 i1 t1", 60, "omni-test:worker:", "omni-test:held:", 10, "z", 0, started, 90]
    assert get_redis().scripts.claim_run(keys=[claim, result], args=args) == "claimed"
    assert redis_client.get(claim) == "w1 i1 t1" and 0 < redis_client.ttl(claim) <= 60
    assert redis_client.get(result) == started and 60 < redis_client.ttl(result) <= 90
    # The same holder claiming again (its own claim) renews it.
    redis_client.expire(claim, 5)
    assert get_redis().scripts.claim_run(keys=[claim, result], args=args) == "claimed"
    assert redis_client.ttl(claim) > 5
