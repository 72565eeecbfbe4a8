"""A producer whose Redis goes away around the accepting step of a `.delay()`: run as its
own process by `coordination/test_send_outage.py`, against a private Redis with AOF.

    python send_outage_client.py   -> prints one JSON object

It starts its own Redis. Each case stops Redis at a given point, starts it again from
its AOF, and reports what the caller got and what Redis holds of the request. A
reaper pass (its ledger grace passed) follows, as a worker would run it: it must
publish nothing the caller was refused.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, its folder comes first on the path, and tests/ has a `workers`
# package of its own: the project's root must come first.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from omni_tasks import SchedulerError, generate_text  # noqa: E402
from omni_tasks.config import get_config  # noqa: E402
from omni_tasks.coordination import acceptance, keys  # noqa: E402
from omni_tasks.coordination.client import get_redis  # noqa: E402
from omni_tasks.coordination.keyspace import keyspace  # noqa: E402
from omni_tasks.dev.restartable_redis import RestartableRedis  # noqa: E402


def what_redis_holds(request_id: str) -> dict[str, Any]:
    client, space = get_redis(), keyspace(get_config().key_prefix)
    queued = [m for k in keys.queue_keys("ar") for m in client.lrange(k, 0, -1)]
    return {
        "queued": sum(json.loads(m)["headers"]["id"] == request_id for m in queued),
        "ledger": bool(client.exists(space.ledger(request_id))),
        "open": client.zscore(space.ledger_open(), request_id) is not None,
        "admitted": client.zscore(space.admitted("ar"), request_id) is not None,
        "fingerprint": bool(client.exists(space.request_fingerprint(request_id))),
    }


def send(request_id: str) -> dict[str, Any]:
    try:
        sent = generate_text.delay(prompt=f"outage {request_id}", request_id=request_id)
    except SchedulerError as exc:
        may = getattr(exc, "may_be_accepted", None)
        return {"error": type(exc).__name__, "may_be_accepted": may, "message": str(exc)}
    return {"id": sent.id}


def around_accept(before: Callable[[], None], after: Callable[[], None]) -> None:
    """Stop Redis just before, or just after, the accepting step of the next send."""
    original = acceptance.Acceptance.accept

    def accept(self: acceptance.Acceptance, *args: Any, **kwargs: Any) -> Any:
        acceptance.Acceptance.accept = original  # once: kombu's retries run the real one
        before()
        found = original(self, *args, **kwargs)
        after()
        return found

    acceptance.Acceptance.accept = accept


def main() -> None:
    server = RestartableRedis()
    server.start()
    # Read when the config is first used, after this: the producer's Redis is this one.
    os.environ["OMNI_REDIS_URL"] = server.url
    os.environ["OMNI_LEDGER_GRACE_S"] = "0.01"
    try:
        print(json.dumps(cases(server)))
    finally:
        server.close()


def cases(server: RestartableRedis) -> dict[str, Any]:
    out: dict[str, Any] = {}
    generate_text.delay(prompt="warm the connections", request_id="warm")
    server.shutdown()  # 1. Redis away before the send
    out["down_before"] = send("down-before")
    server.start()
    around_accept(before=server.shutdown, after=lambda: None)  # 2. lost at the accepting step
    out["down_at_accept"] = send("down-at-accept")
    server.start()
    # 3. lost right after it, and back a second later (Celery's own retries wait for it)
    back = threading.Timer(1.0, server.start)
    around_accept(before=lambda: None, after=lambda: (server.shutdown(), back.start()))
    out["down_after_accept"] = send("down-after-accept")
    back.join()
    from omni_tasks.tasks import app
    from workers.lifecycle.reaper import UNACKED_MIN_AGE_S, Reaper

    out["ledger_grace_s"] = get_config().ledger_grace_s
    # The reaper makes no pass while Redis has just started again: wait that out.
    while int(get_redis().info("server")["uptime_in_seconds"]) < UNACKED_MIN_AGE_S:
        time.sleep(0.2)
    out["reaper"] = Reaper(app).run_once()
    for case in ("down-before", "down-at-accept", "down-after-accept"):
        out[case] = what_redis_holds(case)
    return out


if __name__ == "__main__":
    main()
