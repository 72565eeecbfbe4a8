"""One id, one run: at most one delivery of a request runs at a time, and none runs once
it has succeeded.

Two messages may carry the same request id. A client that does not import omni_tasks
sends the same request twice at a priority (no producer checked its id); a message
restored from a dead worker meets the copy the ledger published again; a client sends
a message again while the first one runs. Before a worker runs a delivery it claims
the id's run (`scripts/claim_run.lua`), in one step with a look at the id's result:

- a success is stored under the id: the delivery is a duplicate, and is not run;
- a live worker holds the claim: the twin is running, and this delivery is a duplicate
  too. It is acknowledged without running; its sender, waiting on the same id, gets the
  twin's result. A claim is live as the reaper sees a held message: its worker beats
  (with the claim's instance) and lists the task in its held set, or the claim is
  younger than `grace_s` (the held set lists a task from the worker's next beat);
- otherwise (no claim, or a dead worker's) the run is this delivery's. So is it for a
  message given back (`taking_over`): the reaper restores or publishes again only what
  no live worker holds, and a broker requeues only a lost connection's messages.

A run that ends without success gives its claim back (`release`), so that the message
handed back or sent again can run. A success keeps it until it expires, beside the
result that says the same.
"""

from __future__ import annotations

import uuid
from typing import Literal

from omni_tasks.coordination.client import OmniRedis

Claim = Literal["claimed", "done", "running"]

#: A claim outlives the longest run by this much (it is only there to be forgotten).
CLAIM_MARGIN_S = 300


def claim_value(hostname: str, instance: str) -> str:
    """A new run's claim: the worker (hostname and instance, as its heartbeat has them)
    and a token of its own, so twins in one worker tell each other apart."""
    return f"{hostname} {instance} {uuid.uuid4().hex[:12]}"


def claim(
    client: OmniRedis,
    task_id: str,
    value: str,
    result: tuple[str, str, int],
    grace_s: float,
    claim_s: int,
    taking_over: bool = False,
) -> Claim:
    """Claim the run of `task_id` for `value` (see the module docstring), for `claim_s`
    (`claim_ttl_s`). `result` is the id's Celery result key, the STARTED state to store
    there once claimed (JSON, as Celery encodes it) and its time to live."""
    result_key, started, ttl_s = result
    args = [value, claim_s, client.keyspace.worker(""), client.keyspace.held(""), grace_s, task_id]
    found = client.scripts.claim_run(
        keys=[client.keyspace.run_claim(task_id), result_key],
        args=[*args, int(taking_over), started, ttl_s],
    )
    return found  # type: ignore[no-any-return]


def release(client: OmniRedis, task_id: str, value: str) -> None:
    """Give the claim of `task_id` back, if `value` still holds it."""
    client.scripts.release_held(keys=[client.keyspace.run_claim(task_id)], args=[value])


def claim_ttl_s(longest_task_s: int) -> int:
    """How long a claim lives: past the longest run any request may have (the config's
    `longest_task_s`)."""
    return 2 * longest_task_s + CLAIM_MARGIN_S
