"""Webhooks: a signed POST when a job ends, delivered at least once by whichever API
process is alive.

Everything a delivery needs lives in Redis, never in one process:

1. A job accepted with a `webhook_url` goes into a watch set (`KeySpace.webhook_watch`).
2. When it ends, the API process that accepted it hears so (pub/sub) and *claims* it:
   one Lua step takes the id out of the watch set and, only if it was there, stores
   the delivery (id, URL, the body to send) and makes it due. Two processes never
   both claim a job. If that process died meanwhile, every API process sweeps the
   watch set every `SWEEP_S` and claims the jobs that ended.
3. Every API process takes due deliveries with a lease (another Lua step pushes their
   due time `lease` ahead), POSTs them, and on a 2xx forgets them; on failure they are
   due again after a backoff (1 s, 2 s, 4 s ... up to `BACKOFF_CAP_S`), until
   `api.webhook_max_attempts`, when they are moved to `KeySpace.webhook_failed`. A process
   that dies mid-POST leaves its delivery to come due again when the lease ends.

So a delivery may arrive twice (a lease that ran out, a receiver that answered too
late), never zero times while Redis keeps its data. Each carries its id
(`X-Omni-Delivery` and the body's `id`): receivers de-duplicate on it. The body is
signed with HMAC-SHA256 under `api.webhook_secret`: `X-Omni-Signature: sha256=<hex>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx

from omni_tasks.api.errors import invalid
from omni_tasks.api.files import output_root
from omni_tasks.api.hub import ResultHub, TaskSet, meta_key, next_message, sweep_forever
from omni_tasks.api.job_state import FINAL, JobRecord, load_record, read_view
from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination.keyspace import keyspace
from omni_tasks.coordination.lua import SOURCES

log = logging.getLogger(__name__)

SWEEP_S = 5.0
#: How often a followed job is read again when no message came (a lost connection).
FOLLOW_RECHECK_S = 10.0
POLL_S = 0.25
BATCH = 20
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0
FAILED_KEPT = 1000
SIGNATURE_HEADER = "X-Omni-Signature"
DELIVERY_HEADER = "X-Omni-Delivery"


def sign(secret: str, body: bytes) -> str:
    """The `X-Omni-Signature` value of `body`: `sha256=` and the hex HMAC-SHA256."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """What a receiver checks: `signature` is `sign(secret, body)` (constant time)."""
    return hmac.compare_digest(sign(secret, body), signature)


def check_url(url: Any, secret: str | None) -> str:
    """A webhook URL the API may POST to (http or https, with a host), or 400; 400 as
    well without a `secret` (`api.webhook_secret`) to sign with."""
    if not isinstance(url, str) or not url:
        raise invalid("webhook_url", "must be an http:// or https:// URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid("webhook_url", "must be an http:// or https:// URL")
    if not secret:
        raise invalid(
            "webhook_url", "webhooks need api.webhook_secret (OMNI_API__WEBHOOK_SECRET) set"
        )
    return url


def backoff(attempts: int) -> float:
    """Seconds before attempt `attempts + 1`: doubling, capped, with 10% jitter."""
    delay = min(BACKOFF_BASE_S * 2 ** max(attempts - 1, 0), BACKOFF_CAP_S)
    return delay * random.uniform(0.9, 1.1)


class WebhookDispatcher:
    """This process's part: following the jobs it accepted, sweeping, delivering."""

    def __init__(self, hub: ResultHub, config: CoreModuleConfig) -> None:
        """`config`: the app's (its `api` webhook settings, the output_dir its job views
        name files under)."""
        self.hub = hub
        self.keys = keyspace(config.key_prefix)
        self.config = config.api
        self.root = output_root(config)
        # The async client registers its own copies of the two scripts (`scripts/`).
        self._claim = hub.redis.register_script(SOURCES["webhook_claim"])
        self._take = hub.redis.register_script(SOURCES["webhook_take"])
        self._tasks = TaskSet()
        self._wake = asyncio.Event()
        self._http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        config = self.config
        self._http = httpx.AsyncClient(timeout=config.webhook_timeout_s, follow_redirects=False)
        self._tasks.spawn(self._deliver_loop())
        self._tasks.spawn(sweep_forever(self.sweep, SWEEP_S, "webhook", log))

    async def stop(self) -> None:
        await self._tasks.cancel_all()
        if self._http is not None:
            await self._http.aclose()

    def follow(self, record: JobRecord) -> None:
        """Claim `record`'s delivery as soon as its job ends (this process lives)."""
        self._tasks.spawn(self._follow(record))

    async def _follow(self, record: JobRecord) -> None:
        channels = [meta_key(t) for t in record.task_ids]
        try:
            async with self.hub.listen(channels) as queue:
                while await self.claim(record) is None:
                    await next_message(queue, FOLLOW_RECHECK_S)
        except Exception:  # the sweep claims it instead
            log.warning("webhook of job %s: follow failed", record.id, exc_info=True)

    async def claim(self, record: JobRecord) -> bool | None:
        """Make the delivery of an ended job due: True; False if another process has
        (or nothing is watched); None while the job has not ended."""
        view = await read_view(self.hub, record, self.root)
        if view["status"] not in FINAL:
            return None
        delivery_id = f"whd_{uuid.uuid4().hex}"
        body = {"id": delivery_id, "type": "job.finished", "created": int(time.time())}
        body["job"] = view
        delivery = {"id": delivery_id, "job_id": record.id, "url": record.webhook_url}
        delivery.update(body=json.dumps(body, separators=(",", ":")), attempts=0)
        claimed = await self._claim(
            keys=[
                self.keys.webhook_watch(),
                self.keys.webhook_due(),
                self.keys.webhook_deliveries(),
            ],
            args=[record.id, delivery_id, json.dumps(delivery), time.time()],
        )
        if claimed:
            self._wake.set()
        return bool(claimed)

    async def sweep(self) -> None:
        """Claim the watched jobs that ended; look at the others again later."""
        now = time.time()
        ids = await self.hub.redis.zrangebyscore(self.keys.webhook_watch(), "-inf", now, 0, 100)
        for job_id in ids:
            record = await load_record(self.hub, job_id)
            if record is None or not record.webhook_url:  # expired: nothing to send
                await self.hub.redis.zrem(self.keys.webhook_watch(), job_id)
            elif await self.claim(record) is None:
                await self.hub.redis.zadd(
                    self.keys.webhook_watch(), {job_id: now + SWEEP_S}, xx=True
                )

    async def deliver_due(self) -> int:
        """POST the deliveries due now (leased meanwhile); how many were taken."""
        lease = self.config.webhook_timeout_s * 2 + 30
        now = time.time()
        ids = await self._take(keys=[self.keys.webhook_due()], args=[now, now + lease, BATCH])
        if not ids:
            return 0
        raw = await self.hub.redis.hmget(self.keys.webhook_deliveries(), ids)
        found = [json.loads(r) for r in raw if r]
        lost = [i for i, r in zip(ids, raw, strict=True) if not r]
        if lost:
            await self.hub.redis.zrem(self.keys.webhook_due(), *lost)
        await asyncio.gather(*(self._deliver(d) for d in found))
        return len(ids)

    async def _deliver(self, delivery: dict[str, Any]) -> None:
        body = delivery["body"].encode()
        delivery["attempts"] += 1
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "omni-tasks-webhooks",
            DELIVERY_HEADER: delivery["id"],
            SIGNATURE_HEADER: sign(self.config.webhook_secret or "", body),
            "X-Omni-Attempt": str(delivery["attempts"]),
        }
        error = None
        try:
            assert self._http is not None
            response = await self._http.post(delivery["url"], content=body, headers=headers)
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        await self._settle(delivery, error)

    async def _settle(self, delivery: dict[str, Any], error: str | None) -> None:
        client, delivery_id = self.hub.redis, delivery["id"]
        job_key = self.keys.api_job(delivery["job_id"])
        pipe = client.pipeline(transaction=True)
        pipe.hset(job_key, "webhook_attempts", delivery["attempts"])
        if error is None or delivery["attempts"] >= self.config.webhook_max_attempts:
            pipe.zrem(self.keys.webhook_due(), delivery_id)
            pipe.hdel(self.keys.webhook_deliveries(), delivery_id)
            pipe.hset(job_key, "webhook_status", "delivered" if error is None else "failed")
            if error is not None:
                log.warning("webhook %s to %s given up: %s", delivery_id, delivery["url"], error)
                record = {k: v for k, v in delivery.items() if k != "body"}
                pipe.lpush(self.keys.webhook_failed(), json.dumps({**record, "error": error}))
                pipe.ltrim(self.keys.webhook_failed(), 0, FAILED_KEPT - 1)
        else:
            pipe.hset(self.keys.webhook_deliveries(), delivery_id, json.dumps(delivery))
            due = time.time() + backoff(delivery["attempts"])
            pipe.zadd(self.keys.webhook_due(), {delivery_id: due})
        await pipe.execute()

    async def _deliver_loop(self) -> None:
        while True:
            try:
                if await self.deliver_due():
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("webhook deliveries failed; retrying", exc_info=True)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)
