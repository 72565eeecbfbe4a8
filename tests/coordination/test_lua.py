"""The Lua scripts: each file documents its KEYS and ARGV in a header; they are registered
once per Redis client; and each one runs on the real Redis and does what its header says.
(The directory scripts through their Python callers: test_cache_directory.py.)"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from helpers import KEYS

from omni_tasks.config import get_config
from omni_tasks.coordination import keys
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.lua import SCRIPTS_DIR, SOURCES, Scripts

SCRIPT_FILES = sorted(SCRIPTS_DIR.glob("*.lua"))


def header(source: str) -> list[str]:
    """The comment lines a script starts with."""
    lines = []
    for line in source.splitlines():
        if not line.startswith("--"):
            break
        lines.append(line)
    return lines


def test_every_script_file_is_loaded() -> None:
    assert len(SCRIPT_FILES) >= 10
    assert sorted(SOURCES) == [p.stem for p in SCRIPT_FILES]
    for path in SCRIPT_FILES:
        assert SOURCES[path.stem] == path.read_text()


@pytest.mark.parametrize("path", SCRIPT_FILES, ids=lambda p: p.stem)
def test_every_script_starts_with_a_header_naming_its_keys_and_argv(path) -> None:
    source = path.read_text()
    lines = header(source)
    assert len(lines) >= 2, f"{path.name} has no header comment"
    text = "\n".join(lines)
    body = source[len(text) :]
    for kind in ("KEYS", "ARGV"):
        used = sorted(set(re.findall(kind + r"\[(\d+|i)\]", body)))
        if kind == "KEYS" or used:
            assert re.search(rf"\b{kind}\b", text), f"{path.name}: the header names no {kind}"
        # Each one the body reads is described, one by one or as a whole ("-- ARGV  a, b").
        whole = re.search(rf"^-- {kind}\s", text, re.M)
        for index in used:
            if index == "i":  # a loop over the rest: "ARGV[4..]"
                described = re.search(rf"{kind}\[\d+\.\.\]", text)
            else:
                described = f"{kind}[{index}]" in text
            assert whole or described, f"{path.name}: {kind}[{index}] is not in the header"


def test_scripts_are_registered_once_per_client(redis_client) -> None:
    scripts = get_redis().scripts
    assert get_redis().scripts is scripts
    config = get_config()
    same = get_redis(config.redis_url, config.key_prefix)
    assert same.scripts is scripts  # the same URL and prefix, the same client
    for name, source in SOURCES.items():
        script = getattr(scripts, name)
        assert script is getattr(scripts, name)
        assert script.registered_client is get_redis()
        assert script.sha == hashlib.sha1(source.encode()).hexdigest()
    with pytest.raises(AttributeError, match="no Lua script 'nope'"):
        scripts.nope  # noqa: B018


def test_scripts_on_another_client_are_their_own() -> None:
    client = get_redis()
    other = Scripts(client)
    assert other is not client.scripts
    assert other.move_all.sha == client.scripts.move_all.sha


def test_admit_redelivery(redis_client) -> None:
    run = get_redis().scripts.admit_redelivery
    revoked, counter = KEYS.revoked("t1"), KEYS.deliveries("t1")
    assert run(keys=[revoked, counter], args=[60]) == [0, 1]
    assert run(keys=[revoked, counter], args=[60]) == [0, 2]
    assert 0 < redis_client.ttl(counter) <= 60
    redis_client.set(revoked, 1)
    assert run(keys=[revoked, counter], args=[60]) == [1, 0]
    assert redis_client.get(counter) == "2"  # a revoked task's counter is not touched


def test_directory_insert_hit_remove_and_clear(redis_client) -> None:
    s = get_redis().scripts
    holders, held = KEYS.cache_holders("lat:1"), KEYS.cache_worker("w1")
    assert s.directory_insert(keys=[holders, held], args=["w1", "lat:1", "diffusion", 10, 5.0]) == 1
    entry = json.loads(redis_client.hget(holders, "w1"))
    assert entry == {"queue": "diffusion", "bytes": 10, "created": 5, "last_hit": 0, "hits": 0}
    assert redis_client.smembers(held) == {"lat:1"}
    assert s.directory_hit(keys=[holders], args=["w1", 7.5]) == 1
    assert s.directory_hit(keys=[holders], args=["w1", 8.5]) == 2
    assert json.loads(redis_client.hget(holders, "w1"))["last_hit"] == 8.5
    assert s.directory_hit(keys=[holders], args=["w2", 9.0]) == 0  # w2 holds nothing
    assert s.directory_remove(keys=[holders, held], args=["w1", "lat:1"]) == 1
    assert not redis_client.exists(holders, held)
    s.directory_insert(keys=[holders, held], args=["w1", "lat:1", "diffusion", 10, 5.0])
    other = KEYS.cache_holders("emb:1")
    s.directory_insert(keys=[other, held], args=["w1", "emb:1", "diffusion", 3, 5.0])
    assert s.directory_clear_worker(keys=[held], args=["w1", KEYS.cache_holders("")]) == 2
    assert not redis_client.exists(holders, other, held)


def test_directory_pick(redis_client) -> None:
    s = get_redis().scripts
    holders = KEYS.cache_holders("lat:1")
    s.directory_insert(keys=[holders, KEYS.cache_worker("w1")], args=["w1", "lat:1", "d", 1, 0])
    args = [KEYS.worker(""), KEYS.worker_queue(""), keys.PRIORITY_SEP, *keys.PRIORITY_STEPS[1:]]
    assert s.directory_pick(keys=[holders], args=args) is None  # no heartbeat: false
    redis_client.hset(KEYS.worker("w1"), "concurrency", 1)
    assert s.directory_pick(keys=[KEYS.cache_holders("lat:none"), holders], args=args) == "w1"
    redis_client.lpush(keys.queue_key(KEYS.worker_queue("w1"), 9), "m")
    assert s.directory_pick(keys=[holders], args=args) is None  # one message, one slot


def test_flight_scripts(redis_client) -> None:
    s = get_redis().scripts
    lease, done = KEYS.flight_lease("k"), KEYS.flight_result("k")
    redis_client.set(lease, "mine", px=1000)
    assert s.flight_renew(keys=[lease], args=["theirs", 60000]) == 0
    assert s.flight_renew(keys=[lease], args=["mine", 60000]) == 1
    assert redis_client.pttl(lease) > 1000
    assert s.release_held(keys=[lease], args=["theirs"]) == 0
    assert redis_client.get(lease) == "mine"
    assert s.flight_publish(keys=[lease, done], args=["theirs", "out", 30]) == 1
    assert redis_client.get(done) == "out" and redis_client.get(lease) == "mine"
    s.flight_publish(keys=[lease, done], args=["mine", "out2", 30])
    assert redis_client.get(done) == "out2" and not redis_client.exists(lease)
    assert 0 < redis_client.ttl(done) <= 30
    redis_client.set(lease, "mine")
    assert s.release_held(keys=[lease], args=["mine"]) == 1
    assert not redis_client.exists(lease)


def test_move_all_keeps_the_order_messages_are_served_in(redis_client) -> None:
    # kombu LPUSHes and consumers pop from the right: the right end is the oldest.
    redis_client.lpush("dst", "old-1")
    for message in ("a", "b", "c"):
        redis_client.lpush("src", message)
    assert get_redis().scripts.move_all(keys=["src", "dst"]) == 3
    assert not redis_client.exists("src")
    served = [redis_client.rpop("dst") for _ in range(4)]
    assert served == ["old-1", "a", "b", "c"]
    assert get_redis().scripts.move_all(keys=["src", "dst"]) == 0


def test_admit_many_accepts_a_batch_whole_or_refuses_it_whole(redis_client) -> None:
    pool, open_set = KEYS.admitted("ar"), KEYS.ledger_open()

    def run(ids: list[str], fingerprint: str = "f", limit: int = 3) -> list[int]:
        script_keys, args = [open_set], [100.0, 60, 60, 4]
        for i in ids:
            script_keys += [pool, KEYS.request_fingerprint(i), KEYS.ledger(i), "q"]
            args += [i, limit, fingerprint, i, "task", "[]", "{}", "{}", f"message {i}"]
        return get_redis().scripts.admit_many(keys=script_keys, args=args)

    assert run(["a", "b"]) == [1, 1, 1]
    assert redis_client.lrange("q", 0, -1) == ["message b", "message a"]
    assert redis_client.hget(KEYS.ledger("a"), "task") == "task"
    assert run(["c", "d", "a"]) == [-1, 1, 2, 2]  # 2 admitted + 2 new > 3: none of it
    assert run(["c", "a"], fingerprint="other") == [-2, 2]  # a holds another fingerprint
    assert redis_client.zcard(pool) == 2 and redis_client.llen("q") == 2
    assert not redis_client.exists(KEYS.request_fingerprint("c"), KEYS.ledger("c"))
    assert run(["a", "c"]) == [1, 2, 1]  # a repeat is left out, c is admitted
    assert redis_client.llen("q") == 3 and redis_client.zcard(open_set) == 3


def test_every_script_runs_in_a_test_here() -> None:
    from pathlib import Path

    text = Path(__file__).read_text()
    untested = [name for name in SOURCES if f".{name}" not in text.replace(" ", "")]
    assert untested == []


def test_claim_run_answers_done_running_or_claimed(redis_client) -> None:
    s = get_redis().scripts
    claim, result = "run:x", "celery-task-meta-x"
    beats, held = "omni-test:worker:", "omni-test:held:"

    def run(value: str) -> str:
        args = [value, 60, beats, held, 10, "x", 0, '{"status": "STARTED"}', 60]
        return s.claim_run(keys=[claim, result], args=args)

    assert run("w1 i1 t1") == "claimed"
    redis_client.hset(beats + "w1", "instance", "i1")  # w1 is alive, the claim is new
    assert run("w2 i2 t2") == "running"
    redis_client.expire(claim, 30)  # 30 s old: live only if w1 lists it
    redis_client.sadd(held + "w1", "x")
    assert run("w2 i2 t2") == "running"
    given_back = [claim, result], ["w4 i4 t4", 60, beats, held, 10, "x", 1, "{}", 60]
    assert s.claim_run(keys=given_back[0], args=given_back[1]) == "claimed"  # takes over
    redis_client.set(claim, "w1 i1 t1", ex=30)
    redis_client.hset(beats + "w1", "instance", "i9")  # w1 restarted: its claim is dead
    assert run("w2 i2 t2") == "claimed"
    redis_client.set(result, '{"status": "SUCCESS"}')
    assert run("w3 i3 t3") == "done"
    assert redis_client.get(claim) == "w2 i2 t2"


def test_store_result_never_replaces_a_success_and_publishes_what_it_stores(
    redis_client,
) -> None:
    s, key = get_redis().scripts, "celery-task-meta-y"
    listener = redis_client.pubsub()
    listener.subscribe(key)
    listener.get_message(timeout=1)  # the subscription's confirmation
    started = '{"status": "STARTED", "result": null}'
    assert s.store_result(keys=[key], args=[started, 60]) == 1
    assert redis_client.get(key) == started and 0 < redis_client.ttl(key) <= 60
    assert listener.get_message(timeout=1)["data"] == started
    success = json.dumps({"status": "SUCCESS", "result": {"text": '"status": "FAILURE"'}})
    assert s.store_result(keys=[key], args=[success, 0]) == 1
    assert redis_client.ttl(key) == -1  # 0: kept without a time to live
    failure = '{"status":"FAILURE","result":{"text":"\\"status\\": \\"SUCCESS\\""}}'
    assert s.store_result(keys=[key], args=[failure, 60]) == 0  # a success stays
    assert redis_client.get(key) == success
    listener.get_message(timeout=1)  # the success
    assert listener.get_message(timeout=0.2) is None  # nothing published for the refusal
    # Text that looks like a success inside a result is not one: it is replaced.
    redis_client.set(key, failure)
    assert s.store_result(keys=[key], args=[started, 60]) == 1
    listener.close()


def test_webhook_claim_takes_a_delivery_once_and_webhook_take_leases_the_due(
    redis_client,
) -> None:
    s = get_redis().scripts
    watch, due, deliveries = "omni-test:wh:watch", "omni-test:wh:due", "omni-test:wh:deliveries"
    redis_client.zadd(watch, {"job1": 1})
    claim = [watch, due, deliveries], ["job1", "d1", '{"id": "d1"}', 100]
    assert s.webhook_claim(keys=claim[0], args=claim[1]) == 1
    assert s.webhook_claim(keys=claim[0], args=claim[1]) == 0  # another process had it
    assert redis_client.hget(deliveries, "d1") == '{"id": "d1"}'
    assert redis_client.zscore(due, "d1") == 100
    redis_client.zadd(due, {"d2": 300})  # not due yet
    assert s.webhook_take(keys=[due], args=[200, 260, 10]) == ["d1"]
    assert redis_client.zscore(due, "d1") == 260  # leased until 260
    assert s.webhook_take(keys=[due], args=[200, 260, 10]) == []
    assert s.webhook_take(keys=[due], args=[400, 460, 1]) == ["d1"]  # at most 1
