"""Per-queue worker settings: `celery -A omni_tasks worker -Q <queue>` needs no other flag,
because the pool type, concurrency and prefetch come from the `-Q` value."""

from __future__ import annotations

import pytest

from omni_tasks.config import ARConfig, CoreModuleConfig, DiffusionConfig
from omni_tasks.tasks.worker_settings import (
    pools_for_queues,
    queues_from_argv,
    worker_settings,
)

CONFIG = CoreModuleConfig(
    ar=ARConfig(queue="ar", pool_type="threads", concurrency=32, prefetch_multiplier=4),
    diffusion=DiffusionConfig(
        queue="diffusion", pool_type="solo", concurrency=2, prefetch_multiplier=1
    ),
)
CELERY = ["celery", "-A", "omni_tasks", "worker"]


@pytest.mark.parametrize(
    ("argv", "queues"),
    [
        ([*CELERY, "-Q", "a,b"], ["a", "b"]),
        ([*CELERY, "-Qa"], ["a"]),
        ([*CELERY, "-Qa,b"], ["a", "b"]),
        ([*CELERY, "--queues=a"], ["a"]),
        ([*CELERY, "--queues", "a"], ["a"]),
        ([*CELERY, "-Q", " a , ,b "], ["a", "b"]),
        ([*CELERY, "--loglevel", "INFO", "-Q", "diffusion", "-n", "w1@h"], ["diffusion"]),
        ([*CELERY], []),  # a worker with no -Q: every queue
        ([*CELERY, "-Q"], []),  # -Q with its value missing
        (["celery", "-A", "omni_tasks", "inspect", "ping", "-Q", "a"], None),  # not a worker
        (["python", "app.py"], None),
        ([], None),
    ],
)
def test_queues_from_argv(argv: list[str], queues: list[str] | None) -> None:
    assert queues_from_argv(argv) == queues


def test_a_worker_of_one_queue_gets_its_pool_settings() -> None:
    assert worker_settings(CONFIG, ["ar"]) == {
        "worker_pool": "threads",
        "worker_concurrency": 32,
        "worker_prefetch_multiplier": 4,
    }
    assert worker_settings(CONFIG, ["diffusion"]) == {
        "worker_pool": "solo",
        "worker_concurrency": 2,
        "worker_prefetch_multiplier": 1,
    }


def test_a_worker_of_both_queues_adds_the_slots_and_falls_back_to_threads() -> None:
    both = worker_settings(CONFIG, ["ar", "diffusion"])
    assert both == {
        "worker_pool": "threads",  # the pools differ: threads serve both
        "worker_concurrency": 34,
        "worker_prefetch_multiplier": 1,
    }
    every = {**both, "worker_concurrency": 34 + CONFIG.speech.concurrency}
    assert worker_settings(CONFIG, []) == every  # no -Q: every pool, the speech pool too
    same = CoreModuleConfig(
        ar=ARConfig(pool_type="prefork", concurrency=4),
        diffusion=DiffusionConfig(pool_type="prefork", concurrency=3),
    )
    assert worker_settings(same, ["ar", "diffusion"])["worker_pool"] == "prefork"


def test_a_worker_of_other_queues_gets_no_pool_settings() -> None:
    assert worker_settings(CONFIG, ["omni.w.diffusion-1@host"]) == {}
    assert pools_for_queues(CONFIG, ["elsewhere"]) == []
    assert pools_for_queues(CONFIG, ["diffusion", "elsewhere"]) == [CONFIG.diffusion]
    assert pools_for_queues(CONFIG, []) == [CONFIG.ar, CONFIG.diffusion, CONFIG.speech]
