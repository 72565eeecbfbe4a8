"""Streamed text between processes: the worker side's `DeltaWriter` (one pipelined write
per flush, a run starting afresh, nothing lost at close) and the producer side's
`stream_text`, on a real Redis and Celery's real result backend (no worker needed: the
result is stored as a worker stores it)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from celery import states
from helpers import KEYS

from omni_tasks import app, stream_text
from omni_tasks.errors import ProcessingError, RequestTimeoutError
from omni_tasks.requests import create_text_request
from workers.text_stream import DeltaWriter, TextStream, streaming


def pieces(client, request_id: str) -> list[dict]:
    return [json.loads(r) for r in client.lrange(KEYS.text_deltas(request_id), 0, -1)]


def test_pieces_of_many_requests_are_written_in_order_and_flushed_at_close(redis_client) -> None:
    writer = DeltaWriter(lambda: redis_client)
    streams = [TextStream(KEYS.text_deltas(f"w-{i}"), writer) for i in range(8)]
    for step in range(50):  # as an engine's steps would: every request, every step
        for i, stream in enumerate(streams):
            stream(0, f"{i}:{step} ")
    for stream in streams:
        stream.close()
    for i in range(8):
        assert "".join(p["t"] for p in pieces(redis_client, f"w-{i}")) == "".join(
            f"{i}:{s} " for s in range(50)
        )
    assert 1 <= writer.writes < 50 * 8  # flushes wrote many pieces at once
    assert 0 < redis_client.ttl(KEYS.text_deltas("w-0")) <= 3600


def test_a_new_run_replaces_a_lost_runs_pieces(redis_client) -> None:
    redis_client.rpush(KEYS.text_deltas("again"), json.dumps({"i": 0, "t": "stale"}))
    writer = DeltaWriter(lambda: redis_client)
    stream = TextStream(KEYS.text_deltas("again"), writer)
    stream(0, "fresh")
    stream.close()
    assert [p["t"] for p in pieces(redis_client, "again")] == ["fresh"]


def test_only_a_streamed_request_gets_a_stream(redis_client) -> None:
    writer = DeltaWriter(lambda: redis_client)
    with streaming(create_text_request("hi"), writer, KEYS) as quiet:
        assert quiet is None
    request = create_text_request("hi", stream=True)
    with streaming(request, writer, KEYS) as on_delta:
        assert on_delta is not None
        on_delta(0, "a")
        on_delta(0, "b")
    assert [p["t"] for p in pieces(redis_client, request.request_id)] == ["a", "b"]


def store(request_id: str, text: str, state: str = states.SUCCESS) -> None:
    result = {"text": text, "choices": []} if state == states.SUCCESS else RuntimeError("boom")
    app.backend.store_result(request_id, result, state)


def test_stream_text_reads_from_the_first_piece_and_ends_with_the_result(redis_client) -> None:
    writer = DeltaWriter(lambda: redis_client)
    stream = TextStream(KEYS.text_deltas("follow"), writer)

    def generate() -> None:
        for word in ("once ", "upon ", "a ", "time"):
            stream(0, word)
            time.sleep(0.05)
        stream.close()
        store("follow", "once upon a time")

    stream(0, "")  # a step whose text is held back
    producer = threading.Thread(target=generate)
    producer.start()
    got = [p.text for p in stream_text("follow", timeout_s=10)]
    producer.join()
    assert got == ["", "once ", "upon ", "a ", "time"]


def test_stream_text_of_a_request_sent_without_stream_yields_its_text(redis_client) -> None:
    store("quiet", "all at once")
    assert [p.text for p in stream_text("quiet", timeout_s=5)] == ["all at once"]


def test_stream_text_raises_the_failure_a_timeout_and_a_restart(redis_client) -> None:
    store("failed", "", states.FAILURE)
    with pytest.raises(RuntimeError, match="boom"):
        list(stream_text("failed", timeout_s=5))
    with pytest.raises(RequestTimeoutError):
        list(stream_text("never", timeout_s=0.3))

    writer = DeltaWriter(lambda: redis_client)
    first = TextStream(KEYS.text_deltas("restarted"), writer)
    first(0, "one ")
    first(0, "two ")
    first.close()
    follow = stream_text("restarted", timeout_s=5)
    assert [next(follow).text, next(follow).text] == ["one ", "two "]
    second = TextStream(KEYS.text_deltas("restarted"), writer)  # the message ran again elsewhere
    second(0, "uno")
    second.close()
    store("restarted", "uno")
    with pytest.raises(ProcessingError, match="started again"):
        list(follow)
