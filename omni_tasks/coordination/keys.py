"""Every Redis key omni-tasks uses, in one place: kombu's queue lists, and the keys
under `<key_prefix>:` by name (`KeySpace`, in `keyspace`), here as functions of the
process config's prefix for code that holds no context of its own.

Queues are kombu's lists (one per level, docs/glossary.md); everything else lives under
`<key_prefix>:` so one Redis can serve several deployments.
"""

from __future__ import annotations

from omni_tasks.config import get_config
from omni_tasks.coordination.keyspace import KeySpace, keyspace

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


def _process_keys() -> KeySpace:
    """The `KeySpace` of the process config."""
    return keyspace(get_config().key_prefix)


def stats(queue: str) -> str:
    return _process_keys().stats(queue)


def rejected() -> str:
    return _process_keys().rejected()


def deliveries(task_id: str) -> str:
    return _process_keys().deliveries(task_id)


def run_claim(task_id: str) -> str:
    return _process_keys().run_claim(task_id)


def api_idempotency(request_id: str) -> str:
    return _process_keys().api_idempotency(request_id)


def revoked(task_id: str) -> str:
    return _process_keys().revoked(task_id)


def request_fingerprint(request_id: str) -> str:
    return _process_keys().request_fingerprint(request_id)


def worker(hostname: str) -> str:
    return _process_keys().worker(hostname)


def worker_queue(hostname: str) -> str:
    return _process_keys().worker_queue(hostname)


def stranded() -> str:
    return _process_keys().stranded()


def cache_holders(cache_key: str) -> str:
    return _process_keys().cache_holders(cache_key)


def cache_worker(hostname: str) -> str:
    return _process_keys().cache_worker(hostname)


def cache_stats(queue: str) -> str:
    return _process_keys().cache_stats(queue)


def cache_worker_stats(hostname: str) -> str:
    return _process_keys().cache_worker_stats(hostname)


def lora_stats(queue: str) -> str:
    return _process_keys().lora_stats(queue)


def flight_lease(cache_key: str) -> str:
    return _process_keys().flight_lease(cache_key)


def flight_result(cache_key: str) -> str:
    return _process_keys().flight_result(cache_key)


def ledger(task_id: str) -> str:
    return _process_keys().ledger(task_id)


def ledger_open() -> str:
    return _process_keys().ledger_open()


def worker_beats(kind: str) -> str:
    return _process_keys().worker_beats(kind)


def held(hostname: str) -> str:
    return _process_keys().held(hostname)


def reaper_lock() -> str:
    return _process_keys().reaper_lock()


def timings(queue: str) -> str:
    return _process_keys().timings(queue)


def step_stats(queue: str) -> str:
    return _process_keys().step_stats(queue)


def metrics_samples() -> str:
    return _process_keys().metrics_samples()


def admitted(queue: str) -> str:
    return _process_keys().admitted(queue)


def previews(request_id: str) -> str:
    return _process_keys().previews(request_id)


def text_deltas(request_id: str) -> str:
    return _process_keys().text_deltas(request_id)


def audio_chunks(request_id: str) -> str:
    return _process_keys().audio_chunks(request_id)


def api_job(job_id: str) -> str:
    return _process_keys().api_job(job_id)


def webhook_watch() -> str:
    return _process_keys().webhook_watch()


def webhook_due() -> str:
    return _process_keys().webhook_due()


def webhook_deliveries() -> str:
    return _process_keys().webhook_deliveries()


def webhook_failed() -> str:
    return _process_keys().webhook_failed()


def api_file(file_id: str) -> str:
    return _process_keys().api_file(file_id)


def api_file_content(file_id: str) -> str:
    return _process_keys().api_file_content(file_id)


def api_files() -> str:
    return _process_keys().api_files()


def api_batch(batch_id: str) -> str:
    return _process_keys().api_batch(batch_id)


def api_batches() -> str:
    return _process_keys().api_batches()


def api_batches_active() -> str:
    return _process_keys().api_batches_active()


def api_batch_lines(batch_id: str) -> str:
    return _process_keys().api_batch_lines(batch_id)


def api_batch_pending(batch_id: str) -> str:
    return _process_keys().api_batch_pending(batch_id)


def api_batch_output(batch_id: str) -> str:
    return _process_keys().api_batch_output(batch_id)


def api_batch_errors(batch_id: str) -> str:
    return _process_keys().api_batch_errors(batch_id)


def api_batch_lock(batch_id: str, role: str) -> str:
    return _process_keys().api_batch_lock(batch_id, role)


def api_videos() -> str:
    return _process_keys().api_videos()
