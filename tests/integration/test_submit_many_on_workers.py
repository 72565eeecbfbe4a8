"""`submit_many` on a real AR worker: each request of a batch runs under its own id."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import start_ready_workers
from helpers import KEYS, TEXT_KEYS, mixed_text_requests

from omni_tasks import (
    generate_text,
    submit_many,
)


@pytest.mark.slow
def test_a_worker_runs_a_batch_each_request_under_its_own_id(
    redis_client, tiny_llama_dir: Path, run_dir: Path
) -> None:
    env = {"OMNI_AR__ENGINE": "transformers"}
    (worker,) = start_ready_workers(["ar"], run_dir / "logs", env=env, name="batch")
    try:
        requests = mixed_text_requests(16, "run")
        group = submit_many(requests)
        probes = submit_many(mixed_text_requests(4, "probe"), task="omni_tasks.probe")
        single = generate_text.delay(prompt="run 0", max_tokens=2, priority="high").get(120)
        values = group.get(timeout=180)
        probed = probes.get(timeout=180)
    finally:
        worker.stop()
    assert [v["request_id"] for v in values] == [r.request_id for r in requests]
    assert all(list(v) == TEXT_KEYS == list(single) for v in values)
    assert [v["request_id"] for v in probed] == [f"probe-{i}" for i in range(4)]
    assert redis_client.llen(KEYS.rejected()) == 0  # the worker refused none
    assert redis_client.zcard(KEYS.admitted("ar")) == 0  # every place given back
