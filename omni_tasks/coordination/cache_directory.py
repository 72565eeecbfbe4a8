"""The DiT cache directory in Redis: a request's DiT cache keys, and which live worker
holds which key.

Workers keep the cached tensors in their own device memory; Redis keeps only metadata,
updated on every insert and eviction (so the directory is exact, not guessed from
routing history), and cleared when a worker stops or its heartbeat expires. The
producer reads it to route a repeat request to the worker that holds its keys.

Layout (names in `keys`): `cache:holders:<key>` hash, field = worker hostname, value =
JSON {queue, bytes, created, last_hit, hits}; `cache:worker:<hostname>` set of the
keys a worker holds; `cache:stats:<queue>` / `cache:wstats:<hostname>` hit/miss counters.
Multi-key updates are the `directory_*` Lua scripts (atomic, one round trip).

A request has two DiT cache keys, computed the same way by producers and workers:
- embeddings: what the text encoders see (model, prompt, negative prompt): a new seed
  of a known prompt skips the encoders;
- latents: everything that determines the denoised latents (`generate_cache_key()`
  parts, the model, and the step-cache mode and parameters in force): an exact repeat
  skips denoising and only decodes.
Defaults the request leaves open (model, step cache) come from the pool's config, so a
producer and a worker with the same config agree on the key.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from omni_tasks import lora
from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination import keys, worker_index
from omni_tasks.coordination.client import OmniRedis
from omni_tasks.model_registry import dit_model
from omni_tasks.requests import OmniRequest, RequestType

ENCODER_SETTINGS = "flux-clip77-t5-512"  # what the pipeline's encoders are run with


@dataclass(frozen=True)
class DiTKeys:
    embeddings: str
    latents: str

    def all(self) -> list[str]:
        """Most valuable first (an exact repeat beats a known prompt)."""
        return [self.latents, self.embeddings]


def _digest(kind: str, parts: dict[str, Any]) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return f"{kind}:{hashlib.sha256(text.encode()).hexdigest()}"


def step_cache_of(request: OmniRequest, config: CoreModuleConfig) -> tuple[str, dict[str, float]]:
    """The step-cache mode and parameters a request runs with (the pool's by default)."""
    mode = request.step_cache or config.diffusion.step_cache
    params = request.step_cache_params
    if params is None:
        params = config.diffusion.step_cache_params if mode == config.diffusion.step_cache else {}
    return mode, dict(params)


def dit_keys(request: OmniRequest, config: CoreModuleConfig, prompt: str | None = None) -> DiTKeys:
    """Keys for `request`; `prompt` overrides the prompt (a multimodal DiT stage)."""
    model = dit_model(request, config)
    text = request.prompt if prompt is None else prompt
    encoded: dict[str, Any] = {
        "model": model,
        "prompt": text,
        "negative_prompt": request.negative_prompt,
        "encoders": ENCODER_SETTINGS,
    }
    if request.image is not None:  # an edit model encodes the image with the prompt
        encoded["image"] = hashlib.sha256(str(request.image).encode()).hexdigest()
    embeddings = _digest("emb", encoded)
    mode, params = step_cache_of(request, config)
    parts = request.cache_key_parts()
    parts.update(
        model=model, prompt=text, step_cache=mode, step_cache_params=params, type="dit"
    )  # IMAGE/DIFFUSION/MULTIMODAL alike: the same latents
    if request.image is None:
        parts.pop("strength", None)
    for text_only in ("max_tokens", "temperature", "top_p", "stop"):
        parts.pop(text_only, None)
    return DiTKeys(embeddings=embeddings, latents=_digest("lat", parts))


def affinity_keys(request: OmniRequest, config: CoreModuleConfig) -> list[str]:
    """The directory keys whose holder a DiT request prefers, best first: its exact
    repeat, then its LoRA adapters (a load saved), then its prompt's embeddings. Every
    key names the model, so only a worker serving it can hold one. A MULTIMODAL
    request's prompt is written by its AR stage, so only its adapters count."""
    adapters = lora.directory_keys(request.lora, dit_model(request, config))
    if request.request_type is RequestType.MULTIMODAL:
        return adapters
    found = dit_keys(request, config)
    return [found.latents, *adapters, found.embeddings]


@dataclass
class Holder:
    """One worker's entry for a cache key."""

    worker: str
    queue: str
    bytes: int
    created: float
    last_hit: float
    hits: int


def record_insert(client: OmniRedis, worker: str, queue: str, cache_key: str, nbytes: int) -> None:
    client.scripts.directory_insert(
        keys=[client.keyspace.cache_holders(cache_key), client.keyspace.cache_worker(worker)],
        args=[worker, cache_key, queue, int(nbytes), time.time()],
    )


def record_remove(client: OmniRedis, worker: str, cache_key: str) -> None:
    client.scripts.directory_remove(
        keys=[client.keyspace.cache_holders(cache_key), client.keyspace.cache_worker(worker)],
        args=[worker, cache_key],
    )


def record_hit(client: OmniRedis, worker: str, cache_key: str) -> None:
    client.scripts.directory_hit(
        keys=[client.keyspace.cache_holders(cache_key)], args=[worker, time.time()]
    )


def clear_worker(client: OmniRedis, worker: str) -> int:
    return int(
        client.scripts.directory_clear_worker(
            keys=[client.keyspace.cache_worker(worker)],
            args=[worker, client.keyspace.cache_holders("")],
        )
    )


def holders(client: OmniRedis, cache_key: str) -> list[Holder]:
    """Every worker's entry for `cache_key`, by worker name."""
    raw = client.hgetall(client.keyspace.cache_holders(cache_key))
    return [_holder(worker, json.loads(entry)) for worker, entry in sorted(raw.items())]


def _holder(worker: str, entry: dict[str, Any]) -> Holder:
    if "pool" in entry:  # an entry that names its queue `pool`: read as `queue`
        entry["queue"] = entry.pop("pool")
    return Holder(worker=worker, **entry)


def held_by(client: OmniRedis, worker: str) -> set[str]:
    return set(client.smembers(client.keyspace.cache_worker(worker)))


def pick_holder(client: OmniRedis, cache_keys: list[str]) -> str | None:
    """The live, not overloaded worker holding the first of `cache_keys` it can find.

    Overloaded = its own queue already holds as many requests as it has slots: the
    next one would wait at least one full run there, and a full run is the most a
    cache hit can save (a miss elsewhere costs one run), so past that point spreading
    the work wins.
    """
    space = client.keyspace
    found = client.scripts.directory_pick(
        keys=[space.cache_holders(k) for k in cache_keys],
        args=[
            space.worker(""),
            space.worker_queue(""),
            keys.PRIORITY_SEP,
            *keys.PRIORITY_STEPS[1:],
        ],
    )
    return found or None


def sweep_dead_workers(client: OmniRedis, pool_queue: str) -> list[str]:
    """Clear the entries of the diffusion workers whose heartbeat expired, and move the
    messages left in their own queues (affinity-routed, or restored there after they
    died) back to the pool queue at the same priority; then drop them from the worker
    index. Run periodically by every live DiT worker: O(dead workers), no scan."""
    candidates = worker_index.dead(client, worker_index.DIT)
    if not candidates:
        return []
    pipe = client.pipeline(transaction=False)
    for worker in candidates:
        pipe.exists(client.keyspace.worker(worker))
    dead = [w for w, alive in zip(candidates, pipe.execute(), strict=True) if not alive]
    scripts = client.scripts
    for worker in dead:
        clear_worker(client, worker)
        own = client.keyspace.worker_queue(worker)
        for level in keys.PRIORITY_STEPS:
            scripts.move_all(keys=[keys.queue_key(own, level), keys.queue_key(pool_queue, level)])
    worker_index.forget(client, worker_index.DIT, dead)
    return sorted(dead)


def own_queue_keys(client: OmniRedis) -> list[tuple[str, str, int]]:
    """(list key, worker, priority level) of every level of every indexed diffusion
    worker's own queue (`worker_index.own_queue_keys`)."""
    return worker_index.own_queue_keys(client)


def count_lookup(client: OmniRedis, queue: str, worker: str, kind: str, hit: bool) -> None:
    """Hit/miss counters per pool (named by its queue) and per worker, per kind of entry."""
    field = f"{'hits' if hit else 'misses'}:{kind}"
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(client.keyspace.cache_stats(queue), field, 1)
    pipe.hincrby(client.keyspace.cache_worker_stats(worker), field, 1)
    pipe.execute()


def hit_rate(client: OmniRedis, queue: str, kind: str | None = None) -> tuple[float, int, int]:
    """(rate, hits, misses) of a pool, over one kind of entry or all of them."""
    raw: dict[str, Any] = client.hgetall(client.keyspace.cache_stats(queue))
    hits = sum(int(v) for f, v in raw.items() if f.startswith("hits:") and _kind(f, kind))
    misses = sum(int(v) for f, v in raw.items() if f.startswith("misses:") and _kind(f, kind))
    total = hits + misses
    return (hits / total if total else 0.0), hits, misses


def _kind(field: str, kind: str | None) -> bool:
    return kind is None or field.endswith(":" + kind)


def count_adapter(client: OmniRedis, queue: str, hit: bool, load_s: float = 0.0) -> None:
    """One adapter use on a pool: already loaded (`hit`), or loaded in `load_s`."""
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(client.keyspace.lora_stats(queue), "hits" if hit else "misses", 1)
    if load_s > 0:
        pipe.hincrbyfloat(client.keyspace.lora_stats(queue), "load_s_sum", load_s)
    pipe.execute()


def adapter_stats(client: OmniRedis, queue: str) -> dict[str, float]:
    """A pool's adapter uses: hits, misses, hit_rate and load_s_sum."""
    raw: dict[str, Any] = client.hgetall(client.keyspace.lora_stats(queue))
    hits, misses = int(raw.get("hits", 0)), int(raw.get("misses", 0))
    total = hits + misses
    return {
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / total if total else 0.0,
        "load_s_sum": float(raw.get("load_s_sum", 0.0)),
    }
