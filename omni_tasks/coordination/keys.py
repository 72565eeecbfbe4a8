"""The names kombu gives a queue's lists (one per level, docs/glossary.md) and a model's
queue: they need no key prefix. Everything else omni-tasks keeps lives under
`<key_prefix>:`, named by a `KeySpace` (`keyspace`), so one Redis can serve several
deployments.
"""

from __future__ import annotations

#: kombu's separator between a queue name and its level (its default, so a Celery
#: client with default transport options writes lists the workers read), and the levels
#: a worker reads, 0 served first (kombu's `priority_steps`): a superset of kombu's
#: default steps (0, 3, 6, 9), which such a client's integer levels are rounded down to.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = tuple(range(10))
#: The colon separator (`ar:3`): lists and exchange bindings written with it are
#: converted when a worker starts (`coordination.colon_layout`).
COLON_PRIORITY_SEP = ":"


def queue_key(queue: str, level: int) -> str:
    """The Redis list kombu keeps for one level of a queue (0 is the bare name)."""
    return queue if level == 0 else f"{queue}{PRIORITY_SEP}{level}"


def queue_keys(queue: str) -> list[str]:
    return [queue_key(queue, level) for level in PRIORITY_STEPS]


def parse_queue_key(key: str) -> tuple[str, int]:
    """(queue, level) of a list named by `queue_key`."""
    queue, sep, level = key.rpartition(PRIORITY_SEP)
    if sep and level.isdigit() and int(level) in PRIORITY_STEPS:
        return queue, int(level)
    return key, 0


def model_queue(pool_queue: str, model: str) -> str:
    """The queue of one model of a pool (`diffusion.tiny-flux`): requests naming the
    model go there, and only the workers serving it read it (besides the pool's queue).
    A queue name, like `worker_queue`."""
    return f"{pool_queue}.{model}"
