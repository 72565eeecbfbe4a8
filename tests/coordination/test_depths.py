"""Queue depths (`omni_tasks.coordination.depths`): per pool and level, the diffusion
workers' own queues and the models' queues counting for the diffusion pool (each model's
on its own too); with another broker, an AMQP broker that does not answer reads as
unknown depths."""

from __future__ import annotations

import json
import time
from dataclasses import replace

from helpers import KEYS, write_heartbeat

from omni_tasks import get_config
from omni_tasks.config import ModelEntry
from omni_tasks.coordination import keys
from omni_tasks.coordination.depths import (
    all_depths,
    highest_waiting_level,
    model_depths,
    queue_depths,
    total_queued,
    waiting_above,
)
from omni_tasks.coordination.snapshots import read_snapshot


def test_an_unreachable_amqp_broker_reads_as_unknown_depths(redis_client, use_config) -> None:
    config = replace(get_config(), broker_url="amqp://guest:guest@127.0.0.1:1//")
    use_config(config)
    started = time.monotonic()
    assert queue_depths(redis_client, config) == {queue: {} for queue in config.pool_queues()}
    assert total_queued(redis_client, config) == 0
    assert highest_waiting_level(redis_client, config, [config.diffusion.queue]) is None
    assert read_snapshot(redis_client, config).queued == 0  # status and health still answer
    assert time.monotonic() - started < 30


def test_queue_depths_per_level(redis_client) -> None:
    assert queue_depths(redis_client, get_config()) == {
        "ar": dict.fromkeys(range(10), 0),
        "diffusion": dict.fromkeys(range(10), 0),
        "speech": dict.fromkeys(range(10), 0),
    }
    redis_client.lpush(keys.queue_key("ar", 0), "m1", "m2")
    redis_client.lpush(keys.queue_key("ar", 9), "m3")
    redis_client.lpush(keys.queue_key("diffusion", 6), "m4")
    depths = queue_depths(redis_client, get_config())
    assert depths["ar"][0] == 2 and depths["ar"][9] == 1 and sum(depths["ar"].values()) == 3
    assert depths["diffusion"][6] == 1 and sum(depths["diffusion"].values()) == 1
    assert total_queued(redis_client, get_config()) == 4


def test_workers_own_queues_count_for_the_diffusion_pool(redis_client) -> None:
    for host in ("w1@h", "w2@h"):
        heartbeat = {"hostname": host, "queues": json.dumps(["diffusion"])}
        write_heartbeat(redis_client, host, {**heartbeat, "stages": json.dumps(["dit"])})
    redis_client.lpush(keys.queue_key("diffusion", 6), "m1")
    redis_client.lpush(keys.queue_key(KEYS.worker_queue("w1@h"), 6), "m2", "m3")
    redis_client.lpush(keys.queue_key(KEYS.worker_queue("w2@h"), 0), "m4")
    depths = queue_depths(redis_client, get_config())
    assert depths["diffusion"][6] == 3 and depths["diffusion"][0] == 1
    assert sum(depths["ar"].values()) == 0
    assert total_queued(redis_client, get_config()) == 4


def test_queue_depths_follow_the_configured_queue_names(redis_client) -> None:
    config = get_config()
    renamed = replace(
        config,
        ar=replace(config.ar, queue="text-pool"),
        diffusion=replace(config.diffusion, queue="dit-pool"),
        speech=replace(config.speech, queue="tts-pool"),
    )
    redis_client.lpush(keys.queue_key("text-pool", 3), "m1")
    redis_client.lpush(keys.queue_key("ar", 3), "not counted")
    depths = queue_depths(redis_client, renamed)
    assert set(depths) == {"text-pool", "dit-pool", "tts-pool"} and depths["text-pool"][3] == 1


def test_model_queues_count_for_their_pool_and_on_their_own(redis_client, use_config) -> None:
    config = get_config()
    use_config(replace(config, models={"flux-b": ModelEntry(), "flux-c": ModelEntry()}))
    redis_client.lpush(keys.queue_key("diffusion.tiny-flux", 6), "m1", "m2")
    redis_client.lpush(keys.queue_key("diffusion.flux-b", 0), "m3")
    redis_client.lpush(keys.queue_key("diffusion.unregistered", 0), "not counted")
    pools, models = all_depths(redis_client, get_config())
    assert pools["diffusion"][6] == 2 and pools["diffusion"][0] == 1
    # The default video models are registered too (no worker serves them here).
    defaults = {"tiny-wan", "tiny-wan-i2v", "tiny-stable-audio"}
    assert set(models) == {"tiny-flux", "flux-b", "flux-c", *defaults}
    assert (sum(models["tiny-flux"].values()), models["flux-b"][0]) == (2, 1)
    assert sum(models["flux-c"].values()) == 0
    assert (
        model_depths(redis_client, get_config()) == models
        and total_queued(redis_client, get_config()) == 3
    )


def test_waiting_above_looks_only_at_the_better_levels(redis_client) -> None:
    own = KEYS.worker_queue("w1@h")
    redis_client.lpush(keys.queue_key(own, 5), "m")
    redis_client.lpush(keys.queue_key("diffusion", 9), "m")
    assert not waiting_above(
        redis_client, get_config(), ["diffusion", own], 5
    )  # level 5 is not better than 5
    assert waiting_above(redis_client, get_config(), ["diffusion", own], 6)
    assert not waiting_above(redis_client, get_config(), ["diffusion"], 9) and not waiting_above(
        redis_client, get_config(), [own], 0
    )
