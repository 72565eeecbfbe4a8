"""One worker process's state (`workers.runtime`): its identity, model resolution, the
engines it builds once, its DiT cache mirrored into the Redis directory, and `stop()`.

Each test builds its own `WorkerRuntime` (the process-wide `runtime` is left alone) on
the tiny real models and the real Redis of the tests.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from omni_tasks.config import get_config
from omni_tasks.coordination import cache_directory
from omni_tasks.coordination.client import get_redis
from omni_tasks.errors import EngineStoppedError
from workers.dit_cache import GIB
from workers.engines.base import ImageParams, TextParams
from workers.runtime import WorkerIdentity, WorkerRuntime, resolve_model


def test_identity_defaults_and_is_frozen() -> None:
    identity = WorkerIdentity(hostname="w1")
    assert (identity.queues, identity.stages, identity.pool_type, identity.concurrency) == (
        [],
        [],
        "",
        0,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.hostname = "w2"  # type: ignore[misc]


def test_hostname_before_attach_names_host_and_process() -> None:
    runtime = WorkerRuntime()
    assert runtime.hostname == f"{socket.gethostname()}-{os.getpid()}"
    assert runtime.identity.queues == [] and runtime.identity.stages == []


def test_attach_takes_the_workers_identity() -> None:
    runtime = WorkerRuntime()
    identity = WorkerIdentity(
        hostname="dit@host", queues=["diffusion"], stages=["dit"], pool_type="threads"
    )
    runtime.attach(identity)
    assert runtime.identity is identity
    assert runtime.hostname == "dit@host"


def test_an_attached_config_is_the_runtimes_and_an_unattached_runtime_follows_the_process(
    use_config,
) -> None:
    attached, unattached = WorkerRuntime(), WorkerRuntime()
    own = replace(get_config(), key_prefix="attached")
    attached.attach(WorkerIdentity(hostname="cfg@host"), own)
    use_config(replace(get_config(), key_prefix="process"))
    assert attached.config is own and unattached.config.key_prefix == "process"
    assert attached.keys.prefix == attached.redis.keyspace.prefix == "attached"
    assert unattached.keys.prefix == unattached.redis.keyspace.prefix == "process"
    # One connection pool per URL in a process, whatever the prefix.
    assert unattached.redis.connection_pool is attached.redis.connection_pool


def test_resolve_model_existing_path_tiny_name_and_hub_id(
    tiny_flux_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no relative path named like a model here
    config = replace(get_config(), models_dir=str(tiny_flux_dir.parent))
    assert resolve_model(str(tiny_flux_dir), config) == str(tiny_flux_dir)
    # A tiny model's name: the complete one under models_dir (built there if missing).
    assert resolve_model("tiny-flux", config) == str(tiny_flux_dir)
    # Anything else is passed to the loaders as it is (a hub id).
    assert resolve_model("black-forest-labs/FLUX.1-dev", config) == "black-forest-labs/FLUX.1-dev"
    assert resolve_model("no-such-model", config) == "no-such-model"


def test_dit_cache_figures_are_zero_without_a_cache() -> None:
    runtime = WorkerRuntime()
    assert runtime.built_dit_cache is None
    assert runtime.dit_cache_figures() == {
        "dit_cache_bytes": 0,
        "dit_cache_entries": 0,
        "dit_cache_max_bytes": 0,
    }
    assert runtime.built_dit_cache is None  # asking built nothing


def test_dit_cache_figures_and_directory_with_a_cache(tiny_flux_dir: Path, redis_client) -> None:
    config = get_config()
    config = replace(
        config,
        models_dir=str(tiny_flux_dir.parent),
        diffusion=replace(config.diffusion, device="cpu"),
        cache=replace(config.cache, max_memory_gib=0.001),
    )
    runtime = WorkerRuntime()
    runtime.attach(WorkerIdentity(hostname="figures@test", stages=["dit"]))
    try:
        cache = runtime.dit_cache(config)
        assert runtime.built_dit_cache is cache
        assert runtime.dit_cache(config) is cache  # built once
        assert cache.put("k1", torch.zeros(4, 4), lossless=True)
        assert runtime.dit_cache_figures() == {
            "dit_cache_bytes": 64,
            "dit_cache_entries": 1,
            "dit_cache_max_bytes": int(0.001 * GIB),
        }
        # The engine's memory budget counts the cache it was given when built.
        assert runtime.resource_status()["cache_bytes"] == 64
        # Its listener mirrors inserts and removals into the Redis directory.
        assert cache_directory.held_by(get_redis(), "figures@test") == {"k1"}
        (holder,) = cache_directory.holders(get_redis(), "k1")
        assert (holder.worker, holder.queue, holder.bytes) == ("figures@test", "diffusion", 64)
        cache.invalidate("k1")
        assert cache_directory.held_by(get_redis(), "figures@test") == set()
        assert runtime.dit_cache_figures()["dit_cache_entries"] == 0
    finally:
        runtime.stop()


def test_engines_are_built_once_and_stop_makes_them_refuse(tiny_models, tmp_path: Path) -> None:
    config = get_config()
    config = replace(
        config,
        models_dir=str(tiny_models["tiny-llama"].parent),
        ar=replace(config.ar, engine="transformers"),
        diffusion=replace(config.diffusion, device="cpu"),
    )
    runtime = WorkerRuntime()
    runtime.start(["ar", "dit"], config)
    text, image = runtime.text_engine(config), runtime.diffusion_engine(config)
    assert text.name == "transformers"
    assert runtime.text_engine() is text and runtime.diffusion_engine() is image  # once
    assert text.generate("before", "hello", TextParams(max_tokens=2), 60).completion_tokens == 2

    runtime.stop()
    with pytest.raises(EngineStoppedError):
        text.generate("after", "hello", TextParams(max_tokens=2), 60)
    with pytest.raises(EngineStoppedError):
        image.generate("after", "a fox", ImageParams(width=32, height=32, steps=1), 60)
    for build in (runtime.text_engine, runtime.diffusion_engine, runtime.dit_cache):
        with pytest.raises(EngineStoppedError):
            build()
    with pytest.raises(EngineStoppedError):
        runtime.start(["ar"])


def test_stop_is_idempotent_and_a_second_caller_waits() -> None:
    runtime = WorkerRuntime()
    runtime.stop()
    runtime.stop()  # nothing left to do: returns at once
    callers = [threading.Thread(target=runtime.stop) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(5)
    assert not any(caller.is_alive() for caller in callers)
    with pytest.raises(EngineStoppedError, match="shutting down"):
        runtime.text_engine()


def test_scheduler_batch_size_caps_the_text_engines_batch(tiny_llama_dir: Path) -> None:
    from workers.runtime import build_text_engine

    config = get_config()
    config = replace(
        config,
        models_dir=str(tiny_llama_dir.parent),
        scheduler=replace(config.scheduler, batch_size=3),
        ar=replace(config.ar, engine="transformers", model=str(tiny_llama_dir), max_batch_size=16),
    )
    engine = build_text_engine(config)
    try:
        assert engine.max_batch_size == 3
    finally:
        engine.shutdown()
