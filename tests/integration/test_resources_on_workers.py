"""Resource budgets on a real diffusion worker: it refuses what never fits, runs what does
and beats its status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import KEYS

from workers.resources import GIB

STATUS_KEYS = {"device", "total_bytes", "budget_bytes", "used_bytes", "cache_bytes"}
STATUS_KEYS |= {"running", "batch", "adapter_bytes"}


TIMEOUT = 300


def test_a_worker_refuses_what_never_fits_runs_what_does_and_beats_its_status(
    tiny_flux_dir: Path, run_dir: Path, redis_client: Any
) -> None:
    """The tiny Flux at 32x32 needs about 1.1 MiB a step, at 1024x1024 about 10 MiB: with
    a 8 MiB budget less the model (~1.4 MiB) and a 1 MiB cache, one fits, one never does."""
    from celery.result import AsyncResult
    from conftest import clean_redis, start_ready_workers
    from helpers import eventually

    from omni_tasks import generate_image

    clean_redis()
    env = {"OMNI_MAX_MEMORY_GIB": "0.008", "OMNI_CACHE__MAX_MEMORY_GIB": "0.001"}
    (worker,) = start_ready_workers(["diffusion"], run_dir / "logs", env=env, name="budget")
    try:
        big = generate_image.delay(prompt="fox", width=1024, height=1024, steps=2)
        with pytest.raises(Exception, match=r"1024x1024 image needs .*8\.2 MiB budget") as err:
            AsyncResult(big.id).get(TIMEOUT)
        assert type(err.value).__name__ == "ResourceError"
        small = generate_image.delay(prompt="fox", width=32, height=32, steps=2).get(TIMEOUT)
        assert small["width"] == 32 and small["steps_run"] == 2
        raw = eventually(lambda: redis_client.hget(KEYS.worker(worker.hostname), "resource_status"))
        status = json.loads(raw)
        assert set(status) == STATUS_KEYS and status["device"] == "cpu"
        assert status["budget_bytes"] == int(0.008 * GIB)
        assert 0 < status["used_bytes"] < status["budget_bytes"]
    finally:
        worker.stop()
        clean_redis()
