"""The keys of omni-tasks' own Redis state under one `key_prefix` (`KeySpace`): a
process context (the worker runtime, the producer context, the API's app state) builds
it once from its config; `keys` lists every key by name for code without one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class KeySpace:
    """The keys under one `key_prefix`: a process context builds it once from its config
    (`keyspace`), so a key is a format of the prefix it holds."""

    prefix: str

    def stats(self, queue: str) -> str:
        """Hash of a pool's counters: processed, failed, rejected, run_s_sum, queued_s_sum."""
        return f"{self.prefix}:stats:{queue}"

    def rejected(self) -> str:
        """List (newest first, capped) of JSON records of refused or malformed messages."""
        return f"{self.prefix}:rejected"

    def deliveries(self, task_id: str) -> str:
        """How many times a message started running (redelivery cap)."""
        return f"{self.prefix}:deliveries:{task_id}"

    def run_claim(self, task_id: str) -> str:
        """Which delivery of a request runs it now (`coordination.runs`; expires)."""
        return f"{self.prefix}:run:{task_id}"

    def api_idempotency(self, request_id: str) -> str:
        """The HTTP API's fingerprint of a whole call made under an `Idempotency-Key`
        (`omni_tasks.api.idempotency`), by the request id the key gave it."""
        return f"{self.prefix}:api:idempotency:{request_id}"

    def revoked(self, task_id: str) -> str:
        """Set while a request is cancelled, so even workers started later skip it."""
        return f"{self.prefix}:revoked:{task_id}"

    def request_fingerprint(self, request_id: str) -> str:
        """The fingerprint of the request accepted under an id (`coordination.idempotency`)."""
        return f"{self.prefix}:fingerprint:{request_id}"

    def worker(self, hostname: str) -> str:
        """Heartbeat hash of a live worker (expires when it stops beating)."""
        return f"{self.prefix}:worker:{hostname}"

    def worker_queue(self, hostname: str) -> str:
        """A diffusion worker's own queue (cache-affinity routing sends repeats there).

        A queue name, not a key of ours: it must not contain `PRIORITY_SEP`, which kombu
        also uses to join the fields of a queue's exchange binding.
        """
        return f"{self.prefix}.w.{hostname}"

    def stranded(self) -> str:
        """JSON of the last scan for lists of messages no worker reads (`stranded`)."""
        return f"{self.prefix}:stranded"

    def cache_holders(self, cache_key: str) -> str:
        """Hash: worker -> JSON {queue, bytes, created, last_hit, hits} for one DiT cache key."""
        return f"{self.prefix}:cache:holders:{cache_key}"

    def cache_worker(self, hostname: str) -> str:
        """Set of the DiT cache keys a worker holds."""
        return f"{self.prefix}:cache:worker:{hostname}"

    def cache_stats(self, queue: str) -> str:
        """Hash of a pool's DiT cache counters: hits:<kind>, misses:<kind>."""
        return f"{self.prefix}:cache:stats:{queue}"

    def cache_worker_stats(self, hostname: str) -> str:
        """Hash of one worker's DiT cache counters, as `cache_stats`."""
        return f"{self.prefix}:cache:wstats:{hostname}"

    def lora_stats(self, queue: str) -> str:
        """Hash of a pool's LoRA adapter counters: `hits`, `misses` (loaded for a request),
        `load_s_sum` (seconds spent loading)."""
        return f"{self.prefix}:lora:stats:{queue}"

    def flight_lease(self, cache_key: str) -> str:
        """Single-flight lease: the token of the worker computing `cache_key` (expires)."""
        return f"{self.prefix}:flight:lease:{cache_key}"

    def flight_result(self, cache_key: str) -> str:
        """Single-flight outcome, kept briefly for the requests that waited on it."""
        return f"{self.prefix}:flight:done:{cache_key}"

    def ledger(self, task_id: str) -> str:
        """Hash of an accepted request: what it takes to publish it again (task, args,
        kwargs, options), kept until it is done or `result_expires` passes."""
        return f"{self.prefix}:ledger:{task_id}"

    def ledger_open(self) -> str:
        """Sorted set: the ids of accepted requests not yet known done -> when last published."""
        return f"{self.prefix}:ledger:open"

    def worker_beats(self, kind: str) -> str:
        """Sorted set: hostname -> time of its last beat, for the workers of one kind
        (`coordination.worker_index`): who is alive and who died, read without a scan."""
        return f"{self.prefix}:beats:{kind}"

    def held(self, hostname: str) -> str:
        """Set of the task ids a live worker holds (reserved or running), renewed each beat."""
        return f"{self.prefix}:held:{hostname}"

    def reaper_lock(self) -> str:
        """Held by the one worker running a reaper pass (expires)."""
        return f"{self.prefix}:reaper:lock"

    def timings(self, queue: str) -> str:
        """Hash of a pool's time histograms per request type: `<type>:<metric>:<le>` bucket
        counts (not cumulative), `<type>:<metric>:sum` and `:count`, for run_s and queued_s."""
        return f"{self.prefix}:timings:{queue}"

    def step_stats(self, queue: str) -> str:
        """Hash of a pool's step-loop figures: batch size histogram (`batch:<le>`,
        `batch:sum`, `batch:count`) and `preemptions`."""
        return f"{self.prefix}:steps:{queue}"

    def metrics_samples(self) -> str:
        """Sorted set: JSON snapshots of the cluster's counters, scored by when they were taken,
        so every process judges rates over the same recent window."""
        return f"{self.prefix}:metrics:samples"

    def admitted(self, queue: str) -> str:
        """Sorted set of a pool's admitted requests not yet final: id -> when admitted.
        Its size is what `scheduler.max_queue_size` bounds."""
        return f"{self.prefix}:admitted:{queue}"

    def previews(self, request_id: str) -> str:
        """List of a running image request's previews (JSON: index, step, steps, PNG base64),
        written by its diffusion worker for the HTTP API; also the channel that announces
        each one. Expires shortly after the request."""
        return f"{self.prefix}:preview:{request_id}"

    def text_deltas(self, request_id: str) -> str:
        """List of a streamed text request's pieces of text in order (JSON: choice index
        `i`, text `t`), written by its AR worker while it generates; also the channel that
        announces each write. Readers (`omni_tasks.streaming`, the HTTP API) follow it by
        position. Expires an hour after the last write."""
        return f"{self.prefix}:deltas:{request_id}"

    def audio_chunks(self, request_id: str) -> str:
        """List of a streamed speech request's audio in order (JSON: chunk index `i`, bytes
        `b` in base64), written by its speech worker as it speaks; also the channel that
        announces each write. Expires like `text_deltas`."""
        return f"{self.prefix}:audio:{request_id}"

    def api_job(self, job_id: str) -> str:
        """Hash of a job the HTTP API accepted: its type, creation time, webhook URL."""
        return f"{self.prefix}:api:job:{job_id}"

    def webhook_watch(self) -> str:
        """Sorted set: ids of jobs with a webhook not yet final -> when to look at them next."""
        return f"{self.prefix}:api:webhooks:watch"

    def webhook_due(self) -> str:
        """Sorted set: pending webhook deliveries -> when their next attempt is due (a claimed
        one is pushed a lease ahead, so a dead API process's delivery becomes due again)."""
        return f"{self.prefix}:api:webhooks:due"

    def webhook_deliveries(self) -> str:
        """Hash: delivery id -> JSON of a pending webhook delivery (URL, body, attempts)."""
        return f"{self.prefix}:api:webhooks:deliveries"

    def webhook_failed(self) -> str:
        """List (newest first, capped) of the webhook deliveries given up, with their last error."""
        return f"{self.prefix}:api:webhooks:failed"

    def api_file(self, file_id: str) -> str:
        """Hash of a file uploaded to (or written by) the Batch API: its OpenAI file object
        fields (`omni_tasks.api.batch_state`); expires with the file."""
        return f"{self.prefix}:api:file:{file_id}"

    def api_file_content(self, file_id: str) -> str:
        """The bytes of a Batch API file (UTF-8 JSONL); expires with the file."""
        return f"{self.prefix}:api:file:content:{file_id}"

    def api_files(self) -> str:
        """Sorted set: Batch API file ids -> when created (ids of expired files are pruned
        as they are met)."""
        return f"{self.prefix}:api:files"

    def api_batch(self, batch_id: str) -> str:
        """Hash of a batch the HTTP API accepted: the batch object's fields, its status and
        timestamps, its counts once final."""
        return f"{self.prefix}:api:batch:{batch_id}"

    def api_batches(self) -> str:
        """Sorted set: batch ids -> when created, for `GET /v1/batches`."""
        return f"{self.prefix}:api:batches"

    def api_batches_active(self) -> str:
        """Sorted set: ids of batches not final yet -> when an API process looks next."""
        return f"{self.prefix}:api:batches:active"

    def api_batch_lines(self, batch_id: str) -> str:
        """Hash: a batch's line index -> JSON of what its outcome needs (custom_id,
        endpoint, request ids, answer options)."""
        return f"{self.prefix}:api:batch:lines:{batch_id}"

    def api_batch_pending(self, batch_id: str) -> str:
        """Set of a batch's line indices whose requests are not all final yet."""
        return f"{self.prefix}:api:batch:pending:{batch_id}"

    def api_batch_output(self, batch_id: str) -> str:
        """Hash: line index -> the output-file line of a request that succeeded."""
        return f"{self.prefix}:api:batch:output:{batch_id}"

    def api_batch_errors(self, batch_id: str) -> str:
        """Hash: line index -> the error-file line of a request that failed or never ran."""
        return f"{self.prefix}:api:batch:errors:{batch_id}"

    def api_batch_lock(self, batch_id: str, role: str) -> str:
        """A batch's lease for one `role` (`launch`, `refresh`, `finalize`): held by the one
        API process doing it (expires)."""
        return f"{self.prefix}:api:batch:lock:{role}:{batch_id}"

    def api_videos(self) -> str:
        """Sorted set: ids of the videos `/v1/videos` accepted -> when created, for
        `GET /v1/videos` (entries past `result_expires` are pruned as lists are read)."""
        return f"{self.prefix}:api:videos"


@functools.cache
def keyspace(prefix: str) -> KeySpace:
    """The `KeySpace` of `prefix`, one per prefix in a process."""
    return KeySpace(prefix)
