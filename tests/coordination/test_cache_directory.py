"""The DiT cache directory in Redis: which live worker holds which DiT cache key, the
pick of a holder for affinity routing, the sweep of dead workers, and the keys of a
request (the same for producers and workers)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import pytest
from helpers import KEYS
from redis import Redis

from omni_tasks import (
    create_diffusion_request,
    create_image_request,
    create_multimodal_request,
    get_config,
)
from omni_tasks.coordination import cache_directory as directory
from omni_tasks.coordination import keys
from omni_tasks.coordination.client import get_redis
from omni_tasks.requests import OmniRequest

POOL = "diffusion"
PNG_1PX = (  # a 1x1 PNG, base64
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmM"
    "IQAAAABJRU5ErkJggg=="
)


def beat(client: Redis, worker: str, concurrency: int = 2) -> None:
    """A live worker's heartbeat hash, as the worker side writes it (it expires)."""
    mapping = {"hostname": worker, "queues": '["diffusion"]', "concurrency": concurrency}
    client.hset(KEYS.worker(worker), mapping=mapping)
    client.expire(KEYS.worker(worker), 30)
    client.zadd(KEYS.worker_beats("dit"), {worker: time.time()})


def died(client: Redis, worker: str) -> None:
    """A diffusion worker whose last beat is long past (its hash has expired)."""
    client.zadd(KEYS.worker_beats("dit"), {worker: time.time() - 600})


def own_queue(worker: str, level: int = 0) -> str:
    return keys.queue_key(KEYS.worker_queue(worker), level)


def test_record_insert_then_holders_and_held_by(redis_client) -> None:
    before = time.time()
    directory.record_insert(get_redis(), "w1", POOL, "lat:a", 4096)
    directory.record_insert(get_redis(), "w2", POOL, "lat:a", 2048)
    directory.record_insert(get_redis(), "w1", POOL, "emb:a", 512)
    (h1, h2) = directory.holders(get_redis(), "lat:a")
    assert (h1.worker, h1.queue, h1.bytes, h1.hits, h1.last_hit) == ("w1", POOL, 4096, 0, 0)
    # Lua's cjson keeps 14 significant digits: a time to about 0.1 ms.
    assert before - 0.001 <= h1.created <= time.time() + 0.001
    assert (h2.worker, h2.bytes) == ("w2", 2048)
    assert directory.held_by(get_redis(), "w1") == {"lat:a", "emb:a"}
    assert directory.held_by(get_redis(), "w2") == {"lat:a"}
    assert (
        directory.holders(get_redis(), "lat:unknown") == []
        and directory.held_by(get_redis(), "w3") == set()
    )


def test_holders_reads_entries_that_name_the_queue_pool(redis_client) -> None:
    # An entry may name its queue "pool"; it is read as the entry's queue.
    old = {"pool": POOL, "bytes": 64, "created": 1.0, "last_hit": 0, "hits": 3}
    redis_client.hset(KEYS.cache_holders("lat:a"), "old-worker", json.dumps(old))
    (entry,) = directory.holders(get_redis(), "lat:a")
    assert (entry.worker, entry.queue, entry.bytes, entry.hits) == ("old-worker", POOL, 64, 3)


def test_record_insert_again_replaces_the_entry(redis_client) -> None:
    directory.record_insert(get_redis(), "w1", POOL, "lat:a", 100)
    directory.record_hit(get_redis(), "w1", "lat:a")
    directory.record_insert(get_redis(), "w1", POOL, "lat:a", 300)
    (entry,) = directory.holders(get_redis(), "lat:a")
    assert (entry.bytes, entry.hits) == (300, 0)


def test_record_hit_counts_and_stamps(redis_client) -> None:
    directory.record_insert(get_redis(), "w1", POOL, "lat:a", 100)
    directory.record_hit(get_redis(), "w1", "lat:a")
    directory.record_hit(get_redis(), "w1", "lat:a")
    directory.record_hit(get_redis(), "w2", "lat:a")  # w2 does not hold it: nothing recorded
    (entry,) = directory.holders(get_redis(), "lat:a")
    assert entry.hits == 2 and entry.last_hit >= entry.created


def test_record_remove_drops_one_worker_entry(redis_client) -> None:
    directory.record_insert(get_redis(), "w1", POOL, "lat:a", 100)
    directory.record_insert(get_redis(), "w2", POOL, "lat:a", 100)
    directory.record_remove(get_redis(), "w1", "lat:a")
    assert [h.worker for h in directory.holders(get_redis(), "lat:a")] == ["w2"]
    assert directory.held_by(get_redis(), "w1") == set()
    directory.record_remove(get_redis(), "w1", "lat:a")  # twice: harmless


def test_clear_worker_forgets_everything_it_held(redis_client) -> None:
    for key in ("lat:a", "emb:a", "lat:b"):
        directory.record_insert(get_redis(), "w1", POOL, key, 100)
    directory.record_insert(get_redis(), "w2", POOL, "lat:a", 100)
    assert directory.clear_worker(get_redis(), "w1") == 3
    assert directory.held_by(get_redis(), "w1") == set()
    assert [h.worker for h in directory.holders(get_redis(), "lat:a")] == ["w2"]
    assert (
        directory.holders(get_redis(), "emb:a") == []
        and directory.holders(get_redis(), "lat:b") == []
    )
    assert directory.clear_worker(get_redis(), "w1") == 0


def test_pick_holder_finds_a_live_worker_with_room(redis_client) -> None:
    assert directory.pick_holder(redis_client, ["lat:a", "emb:a"]) is None  # nobody holds them
    directory.record_insert(get_redis(), "w1", POOL, "emb:a", 100)
    assert (
        directory.pick_holder(redis_client, ["lat:a", "emb:a"]) is None
    )  # w1 is dead: no heartbeat
    beat(redis_client, "w1", concurrency=1)
    assert directory.pick_holder(redis_client, ["lat:a", "emb:a"]) == "w1"
    # The first key the request has wins: the latents' holder over the embeddings'.
    directory.record_insert(get_redis(), "w2", POOL, "lat:a", 100)
    beat(redis_client, "w2", concurrency=1)
    assert directory.pick_holder(redis_client, ["lat:a", "emb:a"]) == "w2"


@pytest.mark.parametrize("level", list(keys.PRIORITY_STEPS))
def test_pick_holder_skips_a_worker_whose_own_queue_is_full_at_any_level(
    redis_client, level: int
) -> None:
    directory.record_insert(get_redis(), "w1", POOL, "lat:a", 100)
    directory.record_insert(get_redis(), "w2", POOL, "emb:a", 100)
    beat(redis_client, "w1", concurrency=3)
    beat(redis_client, "w2", concurrency=1)
    redis_client.lpush(own_queue("w1", level), "m1", "m2")
    assert directory.pick_holder(redis_client, ["lat:a", "emb:a"]) == "w1"  # 2 waiting, 3 slots
    redis_client.lpush(own_queue("w1", (level + 5) % 10), "m3")  # spread over two levels
    assert (
        directory.pick_holder(redis_client, ["lat:a", "emb:a"]) == "w2"
    )  # 3 waiting, 3 slots: full
    redis_client.lpush(own_queue("w2", level), "m4")
    assert directory.pick_holder(redis_client, ["lat:a", "emb:a"]) is None  # both full


def test_pick_holder_ignores_the_shared_pool_queue(redis_client) -> None:
    # Messages in the shared pool queue do not make a holder look busy.
    directory.record_insert(get_redis(), "w1", POOL, "lat:a", 100)
    beat(redis_client, "w1", concurrency=1)
    redis_client.lpush(POOL, "m1", "m2")
    assert directory.pick_holder(redis_client, ["lat:a"]) == "w1"


def test_sweep_moves_a_dead_workers_messages_back_to_the_pool(redis_client) -> None:
    for worker in ("dead-1", "live-1"):
        directory.record_insert(get_redis(), worker, POOL, "lat:a", 100)
    beat(redis_client, "live-1")
    redis_client.lpush(keys.queue_key(POOL, 3), "pool-old")
    redis_client.lpush(own_queue("dead-1", 3), "d3-first", "d3-second")
    redis_client.lpush(own_queue("dead-1", 0), "d0")
    redis_client.lpush(own_queue("live-1", 3), "l3")
    # A dead worker that held nothing but still has messages (restored after it died).
    redis_client.lpush(own_queue("dead-2", 7), "d7")
    died(redis_client, "dead-1")
    died(redis_client, "dead-2")

    assert directory.sweep_dead_workers(get_redis(), POOL) == ["dead-1", "dead-2"]
    assert [h.worker for h in directory.holders(get_redis(), "lat:a")] == ["live-1"]
    assert directory.held_by(get_redis(), "dead-1") == set()
    # Same level, after what was already there, in the order they were sent.
    assert [redis_client.rpop(keys.queue_key(POOL, 3)) for _ in range(3)] == [
        "pool-old",
        "d3-first",
        "d3-second",
    ]
    assert redis_client.lrange(POOL, 0, -1) == ["d0"]
    assert redis_client.lrange(keys.queue_key(POOL, 7), 0, -1) == ["d7"]
    assert not redis_client.exists(own_queue("dead-1", 3), own_queue("dead-1", 0))
    assert redis_client.lrange(own_queue("live-1", 3), 0, -1) == ["l3"]  # a live one keeps its
    assert directory.sweep_dead_workers(get_redis(), POOL) == []  # nothing left to sweep


def test_own_queue_keys_lists_every_level_of_every_indexed_worker(redis_client) -> None:
    beat(redis_client, "w1@h")
    died(redis_client, "w2@h")  # not swept yet: its queue still counts
    found = directory.own_queue_keys(redis_client)
    assert len(found) == 2 * len(keys.PRIORITY_STEPS)
    assert (own_queue("w1@h", 4), "w1@h", 4) in found
    assert (own_queue("w2@h", 9), "w2@h", 9) in found
    assert all(not key.startswith("diffusion") for key, _, _ in found)  # no pool queue


def test_lookup_counters_and_hit_rate(redis_client) -> None:
    for kind, hit in [("latents", True), ("latents", False), ("embeddings", True)]:
        directory.count_lookup(get_redis(), POOL, "w1", kind, hit)
    directory.count_lookup(get_redis(), POOL, "w2", "latents", False)
    assert directory.hit_rate(get_redis(), POOL) == (0.5, 2, 2)
    assert directory.hit_rate(get_redis(), POOL, "latents") == (pytest.approx(1 / 3), 1, 2)
    assert directory.hit_rate(get_redis(), POOL, "embeddings") == (1.0, 1, 0)
    assert directory.hit_rate(get_redis(), "ar") == (0.0, 0, 0)
    per_worker = redis_client.hgetall(KEYS.cache_worker_stats("w1"))
    assert per_worker == {"hits:latents": "1", "misses:latents": "1", "hits:embeddings": "1"}


# DiT cache keys of a request.
def fox(**fields: Any) -> OmniRequest:
    return create_diffusion_request("a red fox", **{"seed": 1, "steps": 4, **fields})


def test_dit_keys_are_stable_for_the_same_request() -> None:
    config = get_config()
    a = directory.dit_keys(fox(), config)
    b = directory.dit_keys(fox(priority="low", timeout_s=9), config)  # not part of the output
    assert a == b
    assert a.all() == [a.latents, a.embeddings]  # the more valuable first
    assert a.latents.startswith("lat:") and a.embeddings.startswith("emb:")


def test_a_new_seed_changes_the_latents_but_not_the_embeddings() -> None:
    config = get_config()
    a, b = directory.dit_keys(fox(seed=1), config), directory.dit_keys(fox(seed=2), config)
    assert a.embeddings == b.embeddings and a.latents != b.latents


@pytest.mark.parametrize(
    ("change", "embeddings_change"),
    [
        ({"steps": 8}, False),
        ({"width": 128}, False),
        ({"guidance": 1.0}, False),
        ({"step_cache": "taylorseer"}, False),
        ({"negative_prompt": "blurry"}, True),
        ({"model": "another-flux"}, True),
    ],
)
def test_what_changes_which_key(change: dict, embeddings_change: bool) -> None:
    config = get_config()
    a, b = directory.dit_keys(fox(), config), directory.dit_keys(fox(**change), config)
    assert a.latents != b.latents
    assert (a.embeddings != b.embeddings) is embeddings_change


def test_defaults_come_from_the_pool_config() -> None:
    config = get_config()
    explicit = fox(model=config.diffusion.model, step_cache=config.diffusion.step_cache)
    assert directory.dit_keys(explicit, config) == directory.dit_keys(fox(), config)
    other_pool = replace(config, diffusion=replace(config.diffusion, model="another-flux"))
    assert directory.dit_keys(fox(), other_pool) != directory.dit_keys(fox(), config)


def test_a_multimodal_dit_stage_shares_keys_with_the_same_picture() -> None:
    config = get_config()
    multi = create_multimodal_request("a lighthouse", seed=1, steps=4, max_tokens=40)
    stage = directory.dit_keys(multi, config, prompt="a red fox")
    assert stage == directory.dit_keys(fox(), config)  # text-only fields play no part
    # An image request's embeddings are keyed by its image too (an edit model encodes the
    # image with the prompt), and so are its latents.
    edit = create_image_request("a red fox", image=PNG_1PX, seed=1, steps=4)
    assert (
        directory.dit_keys(edit, config).embeddings != directory.dit_keys(fox(), config).embeddings
    )
    assert directory.dit_keys(edit, config).latents != directory.dit_keys(fox(), config).latents


def test_step_cache_of_a_request() -> None:
    config = get_config()
    pool = replace(
        config,
        diffusion=replace(config.diffusion, step_cache="magcache", step_cache_params={"k": 2.0}),
    )
    assert directory.step_cache_of(fox(), pool) == ("magcache", {"k": 2.0})
    assert directory.step_cache_of(fox(step_cache="magcache"), pool) == ("magcache", {"k": 2.0})
    assert directory.step_cache_of(fox(step_cache="pab"), pool) == ("pab", {})
    own = fox(step_cache="pab", step_cache_params={"skip": 3.0})
    assert directory.step_cache_of(own, pool) == ("pab", {"skip": 3.0})
