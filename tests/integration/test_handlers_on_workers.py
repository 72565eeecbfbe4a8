"""The redelivery cap on a real worker: a poison message is given up on after its returns."""

from __future__ import annotations

import json

import pytest
from conftest import clean_redis, start_ready_workers
from helpers import KEYS

from omni_tasks import (
    create_diffusion_request,
    submit,
)
from omni_tasks.config import get_config
from omni_tasks.coordination import keys
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.rejections import list_rejections

TIMEOUT = 300


@pytest.fixture()
def clean(tiny_models):
    clean_redis()
    yield
    clean_redis()


@pytest.mark.slow
def test_redelivery_cap_gives_up_on_a_poison_message(clean, run_dir) -> None:
    """A message that keeps coming back (each time a worker died on it) is failed and
    recorded once it has returned `max_redeliveries` times."""
    poison = submit(create_diffusion_request("poison", width=32, height=32, steps=1))
    fine = submit(create_diffusion_request("fine", width=32, height=32, steps=1))
    client = get_redis()
    # Mark the message redelivered exactly as kombu does when it restores one, and
    # record that it already came back `max_redeliveries` times.
    for key in keys.queue_keys(keys.model_queue("diffusion", get_config().diffusion.model)):
        for i, raw in enumerate(client.lrange(key, 0, -1)):
            message = json.loads(raw)
            if message["headers"]["id"] == poison.id:
                message["headers"]["redelivered"] = True
                message["properties"]["delivery_info"]["redelivered"] = True
                client.lset(key, i, json.dumps(message))
    client.set(KEYS.deliveries(poison.id), get_config().max_redeliveries)
    (worker,) = start_ready_workers(["diffusion"], run_dir / "logs")
    try:
        with pytest.raises(Exception, match="max_redeliveries"):
            poison.get(TIMEOUT)
        assert fine.get(TIMEOUT)["width"] == 32  # the worker lives on
    finally:
        worker.stop()
    record = next(r for r in list_rejections(get_redis()) if r["task_id"] == poison.id)
    assert "redelivered" in record["reason"]
