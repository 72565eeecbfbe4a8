"""The DiT cache in a real diffusion pool: what is reused, the Redis directory,
single-flight across worker processes, cache-affinity routing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import clean_redis, start_ready_workers
from helpers import KEYS, assert_png, eventually

from omni_tasks import (
    OmniScheduler,
    app,
    create_diffusion_request,
    generate_image,
    submit,
)
from omni_tasks.config import get_config
from omni_tasks.coordination import cache_directory, keys
from omni_tasks.coordination.cache_directory import dit_keys
from omni_tasks.coordination.client import get_redis
from omni_tasks.scheduling.policies import create_policy
from omni_tasks.tasks.router import resolve_route

pytestmark = pytest.mark.slow
TIMEOUT = 180
# ~7 tiny requests (embeddings 66 KB + latents 1 KB each): a few dozen evict. Exact bytes.
WORKER_ENV = {"OMNI_CACHE__MAX_MEMORY_GIB": "0.0005", "OMNI_CACHE__ENABLE_COMPRESSION": "false"}
SMALL = {"width": 32, "height": 32, "steps": 2}


@pytest.fixture(scope="module")
def two_workers(tiny_models, run_dir: Path) -> Iterator[list]:
    clean_redis()
    workers = start_ready_workers(["diffusion", "diffusion"], run_dir / "logs", env=WORKER_ENV)
    yield workers
    for worker in workers:
        if worker.proc.poll() is None:
            worker.stop()
    clean_redis()


def real_contents(hostname: str) -> set[str]:
    replies = app.control.broadcast("dit_cache", reply=True, destination=[hostname], timeout=5)
    assert replies, f"{hostname} did not answer"
    return set(replies[0][hostname]["keys"])


def directory_of(hostname: str) -> set[str]:
    return cache_directory.held_by(get_redis(), hostname)


def test_exact_repeat_reuses_latents_and_new_seed_reuses_embeddings(two_workers) -> None:
    first = generate_image.delay(prompt="a tiny fox", seed=1, **SMALL).get(TIMEOUT)
    assert first["cache"] == {"latents": "miss", "embeddings": "miss"}
    assert first["steps_run"] == 2
    repeat = generate_image.delay(prompt="a tiny fox", seed=1, **SMALL).get(TIMEOUT)
    assert repeat["cache"] == {"latents": "hit", "embeddings": "skipped", "image": "hit"}
    assert repeat["steps_run"] == 0
    assert repeat["timings"]["decode_s"] == 0.0  # the decoded image was reused
    with open(first["image_path"], "rb") as a, open(repeat["image_path"], "rb") as b:
        assert a.read() == b.read()
    # The repeat went to the worker that held the latents (affinity), so it hit.
    new_seed = generate_image.delay(prompt="a tiny fox", seed=2, **SMALL).get(TIMEOUT)
    assert new_seed["cache"]["latents"] == "miss"
    assert new_seed["cache"]["embeddings"] == "hit"  # affinity on the embeddings key
    assert_png(new_seed["image_path"], 32, 32)
    metrics = OmniScheduler().get_metrics()
    assert 0 < metrics["cache_hit_rate"] < 1


def test_affinity_routes_a_repeat_to_the_holder(two_workers) -> None:
    request = create_diffusion_request("affinity check", seed=5, **SMALL)
    result = submit(request)
    result.get(TIMEOUT)
    (held,) = [
        h.worker
        for h in cache_directory.holders(get_redis(), dit_keys(request, get_config()).latents)
    ]
    assert result.worker == held  # the worker that ran it is the one the directory names
    repeat = create_diffusion_request("affinity check", seed=5, **SMALL)
    route = resolve_route(repeat, "dit", create_policy(get_config()), get_redis())
    assert route.queue == KEYS.worker_queue(held)
    assert route.level == create_policy(get_config()).route(repeat, "dit").level
    value = submit(repeat).get(TIMEOUT)
    assert value["cache"]["latents"] == "hit"
    # Switched off, the same request goes to the pool queue.
    from dataclasses import replace

    config = get_config()
    off = replace(config, diffusion=replace(config.diffusion, cache_affinity=False))

    pool_queue = keys.model_queue(config.diffusion.queue, config.diffusion.model)
    assert resolve_route(repeat, "dit", create_policy(off), get_redis()).queue == pool_queue


def test_single_flight_computes_identical_requests_once(two_workers) -> None:
    requests = [
        create_diffusion_request("one flight", seed=9, width=64, height=64, steps=8)
        for _ in range(4)
    ]
    # Submitted together, before anyone holds the key: they spread over both workers.
    results = [submit(r) for r in requests]
    values = [r.get(TIMEOUT) for r in results]
    computed = [v for v in values if v["cache"]["latents"] == "miss"]
    assert len(computed) == 1, [v["cache"] for v in values]
    assert sum(v["steps_run"] for v in values) == 8  # one denoising run in all
    images = {Path(v["image_path"]).read_bytes() for v in values}
    assert len(images) == 1  # four correct, identical results
    assert len({v["request_id"] for v in values}) == 4


def test_a_dead_holders_lease_expires_and_a_waiter_computes(two_workers) -> None:
    request = create_diffusion_request("orphaned flight", seed=3, **SMALL)
    key = dit_keys(request, get_config()).latents
    # A holder that died right after claiming: its lease is there, no one renews it.
    get_redis().set(KEYS.flight_lease(key), "dead-worker", px=1500)
    started = time.monotonic()
    value = submit(request).get(TIMEOUT)
    assert value["cache"]["latents"] == "miss" and value["steps_run"] == 2
    assert time.monotonic() - started >= 1.0  # it did wait for the lease to lapse


def test_directory_mirrors_real_contents_through_evictions(two_workers) -> None:
    for i in range(40):  # distinct prompts: embeddings + latents each, far over budget
        generate_image.delay(prompt=f"eviction {i}", seed=i, **SMALL).get(TIMEOUT)
    for worker in two_workers:
        real = real_contents(worker.hostname)
        assert directory_of(worker.hostname) == real
        stats = app.control.broadcast(
            "dit_cache", reply=True, destination=[worker.hostname], timeout=5
        )[0][worker.hostname]["stats"]
        assert stats["bytes"] <= stats["max_bytes"]
    total_evictions = sum(
        app.control.broadcast("dit_cache", reply=True, destination=[w.hostname], timeout=5)[0][
            w.hostname
        ]["stats"]["evictions"]
        for w in two_workers
    )
    assert total_evictions > 0
    for worker in two_workers:
        for key in directory_of(worker.hostname):
            entry = {h.worker: h for h in cache_directory.holders(get_redis(), key)}[
                worker.hostname
            ]
            assert entry.bytes > 0 and entry.queue == "diffusion"


def test_killed_worker_is_cleared_from_the_directory(two_workers) -> None:
    victim, survivor = two_workers
    generate_image.delay(prompt="before the kill", seed=1, **SMALL).get(TIMEOUT)
    for i in range(10):  # make sure the victim holds something
        if directory_of(victim.hostname):
            break
        generate_image.delay(prompt=f"fill {i}", seed=i, **SMALL).get(TIMEOUT)
    assert directory_of(victim.hostname)
    victim.kill()
    # Its heartbeat expires, then a live worker's sweep clears its entries.
    assert eventually(lambda: not directory_of(victim.hostname), timeout_s=90, interval_s=1)
    assert directory_of(survivor.hostname) == real_contents(survivor.hostname)
    value = generate_image.delay(prompt="after the kill", seed=1, **SMALL).get(TIMEOUT)
    assert_png(value["image_path"], 32, 32)


def test_step_cache_is_chosen_per_request(two_workers) -> None:
    plain = generate_image.delay(prompt="stepwise", seed=4, width=64, height=64, steps=8).get(
        TIMEOUT
    )
    fast = generate_image.delay(
        prompt="stepwise", seed=4, width=64, height=64, steps=8, step_cache="first_block"
    ).get(TIMEOUT)
    assert plain["step_cache"] == "none" and plain["steps_run"] == 8
    assert fast["step_cache"] == "first_block" and 0 < fast["steps_run"] < 8
    assert fast["cache"]["latents"] == "miss"  # another mode: another latents key
    assert_png(fast["image_path"], 64, 64)
