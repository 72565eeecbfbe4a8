"""Every Redis key omni-tasks uses, in one place: plain functions of the key prefix.

Queues are kombu's lists (one per level, docs/glossary.md); everything else lives under
`<key_prefix>:` so one Redis can serve several deployments.
"""

from __future__ import annotations

from omni_tasks.config import get_config

#: kombu's separator between a queue name and its level (its default, so a Celery
#: client with default transport options writes lists the workers read), and the levels
#: a worker reads, 0 served first (kombu's `priority_steps`): a superset of kombu's
#: default steps (0, 3, 6, 9), which such a client's integer levels are rounded down to.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = tuple(range(10))
#: The colon separator (`ar:3`): lists and exchange bindings written with it are
#: converted when a worker starts (`coordination.colon_layout`).
COLON_PRIORITY_SEP = ":"


def _p() -> str:
    return get_config().key_prefix


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


def stats(queue: str) -> str:
    """Hash of a pool's counters: processed, failed, rejected, run_s_sum, queued_s_sum."""
    return f"{_p()}:stats:{queue}"


def rejected() -> str:
    """List (newest first, capped) of JSON records of refused or malformed messages."""
    return f"{_p()}:rejected"


def deliveries(task_id: str) -> str:
    """How many times a message started running (redelivery cap)."""
    return f"{_p()}:deliveries:{task_id}"


def run_claim(task_id: str) -> str:
    """Which delivery of a request runs it now (`coordination.runs`; expires)."""
    return f"{_p()}:run:{task_id}"


def api_idempotency(request_id: str) -> str:
    """The HTTP API's fingerprint of a whole call made under an `Idempotency-Key`
    (`omni_tasks.api.idempotency`), by the request id the key gave it."""
    return f"{_p()}:api:idempotency:{request_id}"


def revoked(task_id: str) -> str:
    """Set while a request is cancelled, so even workers started later skip it."""
    return f"{_p()}:revoked:{task_id}"


def request_fingerprint(request_id: str) -> str:
    """The fingerprint of the request accepted under an id (`coordination.idempotency`)."""
    return f"{_p()}:fingerprint:{request_id}"


def worker(hostname: str) -> str:
    """Heartbeat hash of a live worker (expires when it stops beating)."""
    return f"{_p()}:worker:{hostname}"


def worker_queue(hostname: str) -> str:
    """A diffusion worker's own queue (cache-affinity routing sends repeats there).

    A queue name, not a key of ours: it must not contain `PRIORITY_SEP`, which kombu
    also uses to join the fields of a queue's exchange binding.
    """
    return f"{_p()}.w.{hostname}"


def model_queue(pool_queue: str, model: str) -> str:
    """The queue of one model of a pool (`diffusion.tiny-flux`): requests naming the
    model go there, and only the workers serving it read it (besides the pool's queue).
    A queue name, like `worker_queue`."""
    return f"{pool_queue}.{model}"


def stranded() -> str:
    """JSON of the last scan for lists of messages no worker reads (`stranded`)."""
    return f"{_p()}:stranded"


def cache_holders(cache_key: str) -> str:
    """Hash: worker -> JSON {queue, bytes, created, last_hit, hits} for one DiT cache key."""
    return f"{_p()}:cache:holders:{cache_key}"


def cache_worker(hostname: str) -> str:
    """Set of the DiT cache keys a worker holds."""
    return f"{_p()}:cache:worker:{hostname}"


def cache_stats(queue: str) -> str:
    """Hash of a pool's DiT cache counters: hits:<kind>, misses:<kind>."""
    return f"{_p()}:cache:stats:{queue}"


def cache_worker_stats(hostname: str) -> str:
    """Hash of one worker's DiT cache counters, as `cache_stats`."""
    return f"{_p()}:cache:wstats:{hostname}"


def lora_stats(queue: str) -> str:
    """Hash of a pool's LoRA adapter counters: `hits`, `misses` (loaded for a request),
    `load_s_sum` (seconds spent loading)."""
    return f"{_p()}:lora:stats:{queue}"


def flight_lease(cache_key: str) -> str:
    """Single-flight lease: the token of the worker computing `cache_key` (expires)."""
    return f"{_p()}:flight:lease:{cache_key}"


def flight_result(cache_key: str) -> str:
    """Single-flight outcome, kept briefly for the requests that waited on it."""
    return f"{_p()}:flight:done:{cache_key}"


def ledger(task_id: str) -> str:
    """Hash of an accepted request: what it takes to publish it again (task, args,
    kwargs, options), kept until it is done or `result_expires` passes."""
    return f"{_p()}:ledger:{task_id}"


def ledger_open() -> str:
    """Sorted set: the ids of accepted requests not yet known done -> when last published."""
    return f"{_p()}:ledger:open"


def worker_beats(kind: str) -> str:
    """Sorted set: hostname -> time of its last beat, for the workers of one kind
    (`coordination.worker_index`): who is alive and who died, read without a scan."""
    return f"{_p()}:beats:{kind}"


def held(hostname: str) -> str:
    """Set of the task ids a live worker holds (reserved or running), renewed each beat."""
    return f"{_p()}:held:{hostname}"


def reaper_lock() -> str:
    """Held by the one worker running a reaper pass (expires)."""
    return f"{_p()}:reaper:lock"


def timings(queue: str) -> str:
    """Hash of a pool's time histograms per request type: `<type>:<metric>:<le>` bucket
    counts (not cumulative), `<type>:<metric>:sum` and `:count`, for run_s and queued_s."""
    return f"{_p()}:timings:{queue}"


def step_stats(queue: str) -> str:
    """Hash of a pool's step-loop figures: batch size histogram (`batch:<le>`,
    `batch:sum`, `batch:count`) and `preemptions`."""
    return f"{_p()}:steps:{queue}"


def metrics_samples() -> str:
    """Sorted set: JSON snapshots of the cluster's counters, scored by when they were taken,
    so every process judges rates over the same recent window."""
    return f"{_p()}:metrics:samples"


def admitted(queue: str) -> str:
    """Sorted set of a pool's admitted requests not yet final: id -> when admitted.
    Its size is what `scheduler.max_queue_size` bounds."""
    return f"{_p()}:admitted:{queue}"


def previews(request_id: str) -> str:
    """List of a running image request's previews (JSON: index, step, steps, PNG base64),
    written by its diffusion worker for the HTTP API; also the channel that announces
    each one. Expires shortly after the request."""
    return f"{_p()}:preview:{request_id}"


def text_deltas(request_id: str) -> str:
    """List of a streamed text request's pieces of text in order (JSON: choice index
    `i`, text `t`), written by its AR worker while it generates; also the channel that
    announces each write. Readers (`omni_tasks.streaming`, the HTTP API) follow it by
    position. Expires an hour after the last write."""
    return f"{_p()}:deltas:{request_id}"


def audio_chunks(request_id: str) -> str:
    """List of a streamed speech request's audio in order (JSON: chunk index `i`, bytes
    `b` in base64), written by its speech worker as it speaks; also the channel that
    announces each write. Expires like `text_deltas`."""
    return f"{_p()}:audio:{request_id}"


def api_job(job_id: str) -> str:
    """Hash of a job the HTTP API accepted: its type, creation time, webhook URL."""
    return f"{_p()}:api:job:{job_id}"


def webhook_watch() -> str:
    """Sorted set: ids of jobs with a webhook not yet final -> when to look at them next."""
    return f"{_p()}:api:webhooks:watch"


def webhook_due() -> str:
    """Sorted set: pending webhook deliveries -> when their next attempt is due (a claimed
    one is pushed a lease ahead, so a dead API process's delivery becomes due again)."""
    return f"{_p()}:api:webhooks:due"


def webhook_deliveries() -> str:
    """Hash: delivery id -> JSON of a pending webhook delivery (URL, body, attempts)."""
    return f"{_p()}:api:webhooks:deliveries"


def webhook_failed() -> str:
    """List (newest first, capped) of the webhook deliveries given up, with their last error."""
    return f"{_p()}:api:webhooks:failed"


def api_file(file_id: str) -> str:
    """Hash of a file uploaded to (or written by) the Batch API: its OpenAI file object
    fields (`omni_tasks.api.batch_state`); expires with the file."""
    return f"{_p()}:api:file:{file_id}"


def api_file_content(file_id: str) -> str:
    """The bytes of a Batch API file (UTF-8 JSONL); expires with the file."""
    return f"{_p()}:api:file:content:{file_id}"


def api_files() -> str:
    """Sorted set: Batch API file ids -> when created (ids of expired files are pruned
    as they are met)."""
    return f"{_p()}:api:files"


def api_batch(batch_id: str) -> str:
    """Hash of a batch the HTTP API accepted: the batch object's fields, its status and
    timestamps, its counts once final."""
    return f"{_p()}:api:batch:{batch_id}"


def api_batches() -> str:
    """Sorted set: batch ids -> when created, for `GET /v1/batches`."""
    return f"{_p()}:api:batches"


def api_batches_active() -> str:
    """Sorted set: ids of batches not final yet -> when an API process looks next."""
    return f"{_p()}:api:batches:active"


def api_batch_lines(batch_id: str) -> str:
    """Hash: a batch's line index -> JSON of what its outcome needs (custom_id,
    endpoint, request ids, answer options)."""
    return f"{_p()}:api:batch:lines:{batch_id}"


def api_batch_pending(batch_id: str) -> str:
    """Set of a batch's line indices whose requests are not all final yet."""
    return f"{_p()}:api:batch:pending:{batch_id}"


def api_batch_output(batch_id: str) -> str:
    """Hash: line index -> the output-file line of a request that succeeded."""
    return f"{_p()}:api:batch:output:{batch_id}"


def api_batch_errors(batch_id: str) -> str:
    """Hash: line index -> the error-file line of a request that failed or never ran."""
    return f"{_p()}:api:batch:errors:{batch_id}"


def api_batch_lock(batch_id: str, role: str) -> str:
    """A batch's lease for one `role` (`launch`, `refresh`, `finalize`): held by the one
    API process doing it (expires)."""
    return f"{_p()}:api:batch:lock:{role}:{batch_id}"


def api_videos() -> str:
    """Sorted set: ids of the videos `/v1/videos` accepted -> when created, for
    `GET /v1/videos` (entries past `result_expires` are pruned as lists are read)."""
    return f"{_p()}:api:videos"
