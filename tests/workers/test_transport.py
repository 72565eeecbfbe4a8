"""The worker's Redis transport (`workers.transport`) without a worker: synchronous reads
skip malformed entries and record them."""

from __future__ import annotations

import json
import uuid

from helpers import envelope

from omni_tasks import app
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.rejections import list_rejections

QUEUE = "diffusion"


IMAGE = "omni_tasks.generate_image"


def test_synchronous_reads_skip_malformed_entries(redis_client) -> None:
    """`basic_get` (no worker needed) drops the garbage and returns the good message."""
    from workers.transport import OmniRedisTransport

    queue, task_id = f"vetting-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    good = envelope(IMAGE, {"prompt": "fox"}, task_id)
    redis_client.lpush(queue, b"42", b"not JSON at all", json.dumps(good))  # popped in order
    with app.connection_for_read(transport=OmniRedisTransport) as conn:
        message = conn.default_channel.basic_get(queue, no_ack=True)
    assert message is not None and message.headers["id"] == task_id
    reasons = [r["reason"] for r in list_rejections(get_redis()) if r["queue"] == queue]
    assert len(reasons) == 2 and "JSON int" in reasons[1] and "not JSON" in reasons[0]
    assert redis_client.llen(queue) == 0
