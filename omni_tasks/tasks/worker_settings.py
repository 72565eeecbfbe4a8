"""Pool type, concurrency and prefetch per queue, so `celery -A omni_tasks worker -Q ar`
needs no other flag.

Celery resolves `--pool`, `--concurrency` and `--prefetch-multiplier` from the app's
config while it parses the worker command line, which happens after the app module
is imported, so the defaults are set at import time from the `-Q` value. Explicit
flags still win.
"""

from __future__ import annotations

from collections.abc import Sequence

from omni_tasks.config import CoreModuleConfig, PoolConfig


def queues_from_argv(argv: Sequence[str]) -> list[str] | None:
    """The `-Q/--queues` value of a `celery worker` command line, or None."""
    args = list(argv)
    if "worker" not in args:
        return None
    for i, arg in enumerate(args):
        value = None
        if arg in ("-Q", "--queues") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--queues="):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-Q") and len(arg) > 2:
            value = arg[2:]
        if value is not None:
            return [q.strip() for q in value.split(",") if q.strip()]
    return []


def pools_for_queues(config: CoreModuleConfig, queues: list[str]) -> list[PoolConfig]:
    """The pool configs a worker consuming `queues` serves (all pools when none named)."""
    pools: list[PoolConfig] = list(config.pools().values())
    if not queues:
        return pools
    return [p for p in pools if p.queue in queues]


def worker_settings(config: CoreModuleConfig, queues: list[str]) -> dict[str, object]:
    """Celery settings for a worker that consumes `queues`."""
    pools = pools_for_queues(config, queues)
    if not pools:
        return {}
    pool_types = {p.pool_type for p in pools}
    pool_type = pool_types.pop() if len(pool_types) == 1 else "threads"
    return {
        "worker_pool": pool_type,
        "worker_concurrency": sum(p.concurrency for p in pools),
        "worker_prefetch_multiplier": min(p.prefetch_multiplier for p in pools),
    }
