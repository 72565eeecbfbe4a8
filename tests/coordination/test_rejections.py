"""Rejected messages: a capped list of JSON records (newest first) and a per-pool
counter; recording never raises, so a refusal cannot take a worker down."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

from helpers import KEYS

from omni_tasks import get_config
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.rejections import (
    MAX_BODY_CHARS,
    MAX_RECORDS,
    list_rejections,
    record_rejection,
)


def test_record_and_list(redis_client) -> None:
    record_rejection(
        get_redis(),
        "not JSON",
        task_id="t1",
        task_name="omni_tasks.generate_text",
        queue="ar",
        body=b"\x80",
    )
    record_rejection(
        get_redis(), "bad field width", task_id="t2", queue="diffusion", body={"width": 30}
    )
    newest, oldest = list_rejections(get_redis())
    assert (newest["task_id"], newest["reason"], newest["queue"]) == (
        "t2",
        "bad field width",
        "diffusion",
    )
    assert newest["task"] is None and json.loads(newest["body"]) == {"width": 30}
    assert oldest["task"] == "omni_tasks.generate_text"
    assert oldest["body"] == "\\x80"  # undecodable bytes are kept visible
    assert (oldest["size"], newest["size"]) == (1, len('{"width": 30}'))
    assert oldest["time"] <= newest["time"]
    assert redis_client.hget(KEYS.stats("ar"), "rejected") == "1"
    assert redis_client.hget(KEYS.stats("diffusion"), "rejected") == "1"
    assert list_rejections(get_redis(), limit=1) == [newest]


def test_defaults_of_a_bare_record(redis_client) -> None:
    record_rejection(get_redis(), "unknown task")
    (record,) = list_rejections(get_redis())
    assert {k: record[k] for k in ("task_id", "task", "queue", "body", "size")} == {
        "task_id": None,
        "task": None,
        "queue": "unknown",
        "body": None,
        "size": None,
    }
    assert redis_client.hget(KEYS.stats("unknown"), "rejected") == "1"


def test_the_list_is_capped(redis_client) -> None:
    for i in range(MAX_RECORDS + 5):
        record_rejection(get_redis(), "flood", task_id=f"t{i}", queue="ar")
    assert redis_client.llen(KEYS.rejected()) == MAX_RECORDS
    records = list_rejections(get_redis(), limit=MAX_RECORDS + 100)
    assert len(records) == MAX_RECORDS
    assert records[0]["task_id"] == f"t{MAX_RECORDS + 4}"  # the newest kept
    assert records[-1]["task_id"] == "t5"  # the oldest five dropped
    assert redis_client.hget(KEYS.stats("ar"), "rejected") == str(MAX_RECORDS + 5)


def test_the_body_preview_is_truncated(redis_client) -> None:
    record_rejection(get_redis(), "huge", task_id="s", body="x" * (MAX_BODY_CHARS + 100))
    record_rejection(get_redis(), "huge bytes", task_id="b", body=b"y" * (MAX_BODY_CHARS * 2))
    record_rejection(get_redis(), "huge object", task_id="o", body={"prompt": "z" * MAX_BODY_CHARS})
    by_id = {r["task_id"]: r for r in list_rejections(get_redis())}
    assert by_id["s"]["body"] == "x" * MAX_BODY_CHARS
    assert by_id["b"]["body"] == "y" * MAX_BODY_CHARS
    assert len(by_id["o"]["body"]) == MAX_BODY_CHARS
    assert by_id["o"]["body"].startswith('{"prompt": "zzz')
    # The size is the whole body's, in bytes.
    assert by_id["s"]["size"] == MAX_BODY_CHARS + 100
    assert by_id["b"]["size"] == MAX_BODY_CHARS * 2
    assert by_id["o"]["size"] == len('{"prompt": ""}') + MAX_BODY_CHARS


def test_raw_bytes_are_bounded_before_they_are_decoded(redis_client) -> None:
    """A 20 MB entry of non-UTF-8 bytes is kept as its first 4 KiB (escaped), not 20 MB."""
    raw = b"\xff" * (20 * 1024 * 1024)
    record_rejection(get_redis(), "garbage", task_id="g", body=raw)
    (record,) = list_rejections(get_redis())
    assert MAX_BODY_CHARS == 4096
    assert record["body"] == "\\xff" * (MAX_BODY_CHARS // 4)
    assert record["size"] == len(raw)
    assert len(redis_client.lindex(KEYS.rejected(), 0)) < 2 * MAX_BODY_CHARS


def test_bodies_json_cannot_encode_are_kept_as_text(redis_client) -> None:
    circular: dict = {}
    circular["self"] = circular
    record_rejection(get_redis(), "circular", task_id="c", body=circular)
    record_rejection(get_redis(), "a set", task_id="s", body={"ids": {1}})
    by_id = {r["task_id"]: r["body"] for r in list_rejections(get_redis())}
    assert by_id["c"] == repr(circular)
    assert by_id["s"] == '{"ids": "{1}"}'


def test_recording_never_raises(redis_client, use_config, caplog) -> None:
    use_config(replace(get_config(), redis_url="redis://127.0.0.1:1/11"))  # nothing listens
    with caplog.at_level(logging.ERROR, logger="omni_tasks.coordination.rejections"):
        record_rejection(get_redis(), "while Redis is away", task_id="lost", queue="ar", body="{}")
    assert "could not record rejected message lost" in caplog.text
    assert "rejected message lost" in caplog.text  # the log still has it
