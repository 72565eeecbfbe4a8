"""The ledger and the reaper on real workers: a lost request is published again, a
killed worker's messages come back long before the visibility timeout, and a message
that comes again for a finished request is skipped, its first result kept.

The workers run the AR pool on the transformers engine (quick to start), with a reaper
pass every second and a 2 s ledger grace.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import clean_redis, start_ready_workers
from helpers import KEYS, eventually

from omni_tasks.config import get_config
from omni_tasks.coordination import ledger
from omni_tasks.coordination.client import get_redis

#: What issue-level reliability promises: a dead worker's requests are back within the
#: heartbeat's expiry (20 s, `workers.lifecycle.heartbeat`) + 60 s.
HEARTBEAT_TTL_S = 20
ENV = {
    "OMNI_AR__ENGINE": "transformers",
    "OMNI_REAPER_INTERVAL_S": "1",
    "OMNI_LEDGER_GRACE_S": "2",
}


@pytest.fixture(scope="module")
def two_workers(tiny_models, run_dir: Path) -> Iterator[list]:
    clean_redis()
    workers = start_ready_workers(["ar", "ar"], run_dir / "logs", env=ENV)
    yield workers
    for worker in workers:
        worker.stop()
    clean_redis()


def _stats(field: str) -> int:
    return int(get_redis().hget(KEYS.stats("ar"), field) or 0)


def test_send_records_the_request_and_a_final_result_closes_it(two_workers) -> None:
    from omni_tasks import generate_text

    result = generate_text.delay(prompt="ledger", max_tokens=4)
    assert ledger.entry(get_redis(), result.id)["kwargs"]["prompt"] == "ledger"
    result.get(120)
    eventually(lambda: result.id not in ledger.open_since(get_redis(), time.time()), timeout_s=15)
    assert ledger.entry(get_redis(), result.id) is None


def test_a_request_lost_after_it_was_accepted_is_published_again(two_workers) -> None:
    from omni_tasks.tasks.celery_app import app

    # The state kombu's BRPOP race leaves: accepted (in the ledger), message nowhere.
    task_id = f"lost-{uuid.uuid4().hex[:8]}"
    message = {"prompt": "lost", "max_tokens": 4, "request_id": task_id}
    entry = ledger.prepare("omni_tasks.generate_text", task_id, [], message, {})
    ledger.record(get_redis(), entry, get_config().result_expires)
    before = _stats("recovered")
    value = app.AsyncResult(task_id).get(60)
    assert value["request_id"] == task_id
    assert _stats("recovered") == before + 1


def test_a_killed_workers_messages_come_back_within_heartbeat_expiry(
    two_workers, tiny_models, run_dir: Path
) -> None:
    from omni_tasks import generate_text
    from omni_tasks.tasks.celery_app import app

    victim = start_ready_workers(["ar"], run_dir / "logs", env=ENV, name="victim")[0]
    others = [w.hostname for w in two_workers]
    # Only the victim consumes while the requests arrive.
    app.control.cancel_consumer("ar", destination=others, reply=True)
    try:
        results = [generate_text.delay(prompt=f"victim {i}", max_tokens=64) for i in range(3)]
        eventually(lambda: results[0].state in ("STARTED", "PROGRESS"), timeout_s=30)
        victim.proc.send_signal(signal.SIGKILL)  # no warm shutdown, nothing handed back
        victim.proc.wait()
        killed_at = time.monotonic()
    finally:
        app.control.add_consumer("ar", destination=others, reply=True)
        victim.stop()  # already killed, unless the test failed first: never left running
    values = [r.get(HEARTBEAT_TTL_S + 60) for r in results]
    assert time.monotonic() - killed_at < HEARTBEAT_TTL_S + 60
    assert [v["request_id"] for v in values] == [r.id for r in results]


def test_a_message_for_a_finished_request_is_skipped_and_the_first_result_kept(
    two_workers,
) -> None:
    from omni_tasks import generate_text

    first = generate_text.delay(prompt="once", max_tokens=4)
    value = first.get(60)
    before = _stats("duplicates")
    again = generate_text.apply_async(
        kwargs={"prompt": "once", "max_tokens": 4, "request_id": first.id},
        headers={ledger.REPUBLISHED_HEADER: True},
    )
    assert again.id == first.id
    eventually(lambda: _stats("duplicates") == before + 1, timeout_s=30)
    assert first.get(5) == value
