"""Remote-control commands the workers answer (`app.control.broadcast(name, reply=True)`)."""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

from workers.runtime import runtime


@inspect_command(name="dit_cache")
def dit_cache(_state: Any, **_: Any) -> dict[str, Any]:
    """The keys this worker's DiT cache really holds, and its figures (what the Redis
    directory must mirror)."""
    cache = runtime.built_dit_cache
    if cache is None:
        return {"keys": [], "stats": {}}
    return {"keys": sorted(cache.keys()), "stats": cache.stats()}
