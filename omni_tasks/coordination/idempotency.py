"""One id, one request: a request id re-used for the same request is an idempotent
repeat, for a different one a conflict.

A request's fingerprint (`OmniRequest.fingerprint`: the request without its id and its
creation time) is kept under its id
(`KeySpace.request_fingerprint`) for `result_expires` seconds from its acceptance.

- **omni-tasks producers** (`.delay()`, `apply_async`, `send_task` on `omni_tasks.app`,
  `submit`, `OmniScheduler`) check and record it when they accept the request, in the
  same step as its admission (`scripts/admit.lua`). A repeat publishes nothing and
  returns the id's result (stored, or still in flight); a conflict raises
  `RequestConflictError` and enqueues nothing. Their messages carry `ACCEPTED_HEADER`.
- **Other clients** (a Celery app that does not import omni_tasks) reach the worker
  directly. A message a worker publishes again on arrival (sent without a priority, or
  to the wrong pool) passes the producer's check then. On a message's first delivery
  without that header, the worker claims the fingerprint (`claim`): a repeat of a
  request that succeeded is not run again (its result stands), a conflict is refused
  and recorded, and a success the id holds stays (`workers.handlers`).

A chain's later stage and a message published again (`ledger.REPUBLISHED_HEADER`, a
redelivery) skip the check: they belong to a request accepted before.
"""

from __future__ import annotations

from typing import Literal

from omni_tasks.coordination.client import OmniRedis

#: Message header of a request an omni-tasks producer accepted (its id checked): the
#: worker does not check it again.
ACCEPTED_HEADER = "omni_accepted"

Claim = Literal["new", "repeat", "conflict"]


def claim(client: OmniRedis, request_id: str, fingerprint: str, ttl_s: int) -> Claim:
    """Record `fingerprint` under `request_id` unless one is there (one round trip), kept
    `ttl_s` (as long as results: `result_expires`): "new" when it was not, "repeat" when
    the same one is, "conflict" otherwise."""
    key = client.keyspace.request_fingerprint(request_id)
    pipe = client.pipeline(transaction=True)
    pipe.set(key, fingerprint, nx=True, ex=int(ttl_s))
    pipe.get(key)
    created, found = pipe.execute()
    if created:
        return "new"
    return "repeat" if found == fingerprint else "conflict"


def forget(client: OmniRedis, request_id: str) -> None:
    """The request was never published (its publish failed): its id is free again."""
    client.delete(client.keyspace.request_fingerprint(request_id))
