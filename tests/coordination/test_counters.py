"""Batched success counters: added in memory, written to Redis in one pipeline per flush
(every FLUSH_INTERVAL_S in the background, and on demand)."""

from __future__ import annotations

import pytest
from helpers import KEYS, eventually
from redis import Redis

from omni_tasks import get_config
from omni_tasks.coordination import counters
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.counters import SuccessCounters


def stats(client: Redis, queue: str) -> dict[str, str]:
    return client.hgetall(KEYS.stats(queue))


def test_successes_are_batched_until_a_flush(redis_client, monkeypatch) -> None:
    monkeypatch.setattr(counters, "FLUSH_INTERVAL_S", 3600.0)  # no background flush here
    batch = SuccessCounters(get_redis)
    batch.add_success("ar", run_s=0.5, queued_s=0.25)
    batch.add_success("ar", run_s=1.5, queued_s=0.75)
    batch.add_success("diffusion", run_s=2.0, queued_s=0.0)
    assert stats(redis_client, "ar") == {}  # nothing written per success
    batch.flush()
    ar = stats(redis_client, "ar")
    assert int(ar["processed"]) == 2
    assert float(ar["run_s_sum"]) == pytest.approx(2.0)
    assert float(ar["queued_s_sum"]) == pytest.approx(1.0)
    assert int(stats(redis_client, "diffusion")["processed"]) == 1
    batch.flush()  # nothing pending: nothing added twice
    assert int(stats(redis_client, "ar")["processed"]) == 2


def test_flushes_add_to_what_redis_holds(redis_client, monkeypatch) -> None:
    monkeypatch.setattr(counters, "FLUSH_INTERVAL_S", 3600.0)
    redis_client.hset(KEYS.stats("ar"), mapping={"processed": 10, "failed": 2})
    first, second = (
        SuccessCounters(get_redis),
        SuccessCounters(get_redis),
    )  # two workers of one pool
    first.add_success("ar", 1.0, 0.1)
    second.add_success("ar", 3.0, 0.3)
    first.flush()
    second.flush()
    ar = stats(redis_client, "ar")
    assert (int(ar["processed"]), int(ar["failed"])) == (12, 2)
    assert float(ar["run_s_sum"]) == pytest.approx(4.0)


def test_the_background_thread_flushes_on_its_own(redis_client) -> None:
    batch = SuccessCounters(get_redis)
    batch.add_success("ar", 0.1, 0.2)
    written = eventually(lambda: stats(redis_client, "ar").get("processed"), timeout_s=5)
    assert written == "1"
    assert float(stats(redis_client, "ar")["queued_s_sum"]) == pytest.approx(0.2)


def test_a_failed_flush_keeps_the_counts_for_the_next(
    redis_client, monkeypatch, use_config
) -> None:
    from dataclasses import replace

    monkeypatch.setattr(counters, "FLUSH_INTERVAL_S", 3600.0)
    reachable = get_config()
    batch = SuccessCounters(get_redis)
    batch.add_success("ar", 1.0, 0.5)
    use_config(replace(reachable, redis_url="redis://127.0.0.1:1/11"))  # nothing listens there
    batch.flush()  # logs a warning, raises nothing
    batch.add_success("ar", 2.0, 0.5)
    use_config(reachable)
    batch.flush()
    ar = stats(redis_client, "ar")
    assert int(ar["processed"]) == 2
    assert float(ar["run_s_sum"]) == pytest.approx(3.0)
    assert float(ar["queued_s_sum"]) == pytest.approx(1.0)


def test_outcomes_are_counted_at_once(redis_client) -> None:
    from omni_tasks.coordination.counters import count_outcome

    for outcome in ("failed", "expired", "expired", "cancelled"):
        count_outcome(redis_client, "diffusion", outcome)
    assert redis_client.hgetall(KEYS.stats("diffusion")) == {
        "failed": "1",
        "expired": "2",
        "cancelled": "1",
    }
    with pytest.raises(ValueError, match="outcome"):
        count_outcome(redis_client, "diffusion", "lost")


def test_times_go_into_per_type_histograms_in_the_same_flush(redis_client, monkeypatch) -> None:
    from omni_tasks.coordination.counters import TIME_BUCKETS, read_histogram

    monkeypatch.setattr(counters, "FLUSH_INTERVAL_S", 3600.0)
    batch = SuccessCounters(get_redis)
    batch.add_success("ar", run_s=0.003, queued_s=0.2, request_type="text")
    batch.add_success("ar", run_s=0.7, queued_s=0.2, request_type="text")
    batch.add_success("ar", run_s=9999.0, queued_s=0.0, request_type="text")  # past 600 s
    batch.add_success("ar", run_s=1.0, queued_s=1.0)  # no type: the pool totals only
    batch.add_success("ar", run_s=0.1, queued_s=0.0, request_type="multimodal")
    assert redis_client.hgetall(KEYS.timings("ar")) == {}
    batch.flush()
    raw = redis_client.hgetall(KEYS.timings("ar"))
    assert raw["text:run_s:0.005"] == raw["text:run_s:1.0"] == raw["text:run_s:+Inf"] == "1"
    buckets, total, count = read_histogram(raw, "text:run_s", TIME_BUCKETS)
    assert count == 3 and total == pytest.approx(9999.703)
    cumulative = dict(buckets)
    assert (cumulative["0.005"], cumulative["0.5"], cumulative["1.0"]) == (1, 1, 2)
    assert cumulative["600.0"] == 2 and cumulative["+Inf"] == 3
    waits, wait_sum, _ = read_histogram(raw, "text:queued_s", TIME_BUCKETS)
    assert dict(waits)["0.1"] == 1 and dict(waits)["0.25"] == 3  # 0.0 is in the first bucket
    assert wait_sum == pytest.approx(0.4)
    assert read_histogram(raw, "multimodal:run_s", TIME_BUCKETS)[2] == 1  # its own series
    assert int(stats(redis_client, "ar")["processed"]) == 5


def test_batch_sizes_and_preemptions_are_flushed_with_the_rest(redis_client, monkeypatch) -> None:
    from omni_tasks.coordination.counters import BATCH_BUCKETS, read_histogram

    monkeypatch.setattr(counters, "FLUSH_INTERVAL_S", 3600.0)
    batch = SuccessCounters(get_redis)
    for size in (1, 3, 3, 8):
        batch.add_batch("diffusion", size)
    batch.add_preemptions("diffusion", 2)
    batch.add_preemptions("diffusion", 0)  # a request never paused adds nothing
    batch.flush()
    raw = redis_client.hgetall(KEYS.step_stats("diffusion"))
    assert raw["preemptions"] == "2"
    buckets, total, count = read_histogram(raw, "batch", BATCH_BUCKETS)
    assert (count, total) == (4, 15.0)
    assert dict(buckets) == {
        "1.0": 1, "2.0": 1, "4.0": 3, "8.0": 4, "16.0": 4, "32.0": 4, "64.0": 4, "+Inf": 4
    }  # fmt: skip


def test_a_failed_flush_keeps_the_histograms_too(redis_client, monkeypatch, use_config) -> None:
    from dataclasses import replace

    monkeypatch.setattr(counters, "FLUSH_INTERVAL_S", 3600.0)
    reachable = get_config()
    batch = SuccessCounters(get_redis)
    batch.add_success("diffusion", 2.0, 0.5, request_type="diffusion")
    batch.add_batch("diffusion", 2)
    use_config(replace(reachable, redis_url="redis://127.0.0.1:1/11"))
    batch.flush()
    use_config(reachable)
    batch.add_preemptions("diffusion", 1)
    batch.flush()
    timings = redis_client.hgetall(KEYS.timings("diffusion"))
    assert (timings["diffusion:run_s:2.5"], timings["diffusion:run_s:count"]) == ("1", "1")
    assert float(timings["diffusion:queued_s:sum"]) == pytest.approx(0.5)
    steps = redis_client.hgetall(KEYS.step_stats("diffusion"))
    assert (steps["batch:2.0"], steps["preemptions"]) == ("1", "1")
