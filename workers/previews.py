"""Previews of a running image request: its intermediate latents, decoded at a few step
boundaries and published through Redis, where the HTTP API (a separate, stateless
process) streams them (`stream: true` with `partial_images`).

A request asks for up to `MAX_PARTIAL_IMAGES` (`OmniRequest.partial_images`). They are
taken at step boundaries spread evenly over its denoising steps, never after the last
(the final image follows). The engine decodes each with the family's own decode, on its
device thread (`workers.engines.diffusion.previews`), and hands it to the request's
`Previewer` (its `StepTicket.preview`), which writes it as PNG base64 to a Redis list
(`KeySpace.previews`, with a TTL) and announces it on the channel of the same name. A
preview that fails is logged and skipped: it never fails the request.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from omni_tasks.coordination.client import OmniRedis
from omni_tasks.coordination.outage import Outage
from omni_tasks.requests import MAX_PARTIAL_IMAGES, OmniRequest

log = logging.getLogger(__name__)
_outage = Outage("previews", log)
#: How long a request's previews stay readable after the last one was written.
PREVIEW_TTL_S = 600


def preview_steps(count: int, total: int) -> list[int]:
    """The steps (1-based, each < `total`) after which the `count` previews are taken:
    spread evenly, so a preview shows the image at 1/(count+1), 2/(count+1), ..."""
    count = max(0, min(count, MAX_PARTIAL_IMAGES))
    steps = {round((i + 1) * total / (count + 1)) for i in range(count)}
    return sorted(s for s in steps if 1 <= s < total)


@dataclass
class Previewer:
    """The previews one request wants (a `StepTicket.preview` sink), written with the
    worker's Redis client (an `OmniRedis`) under its keys."""

    request_id: str
    count: int
    redis: OmniRedis = field(repr=False)
    sent: int = 0
    _steps: list[int] | None = field(default=None, repr=False)

    def due(self, step: int, total: int) -> bool:
        """Whether a preview is taken once step `step` (1-based) of `total` has ended."""
        if self._steps is None:
            self._steps = preview_steps(self.count, total)
        return step in self._steps

    def publish(self, image: Any, step: int, total: int) -> None:
        """Publish the decoded `image` of step `step`; never raises (Redis may be away)."""
        _outage.run(self._publish, image, step, total)

    def _publish(self, image: Any, step: int, total: int) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        record = {
            "index": self.sent,
            "step": step,
            "steps": total,
            "b64_png": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "time": time.time(),
        }
        key = self.redis.keyspace.previews(self.request_id)
        pipe_ = self.redis.pipeline(transaction=True)
        pipe_.rpush(key, json.dumps(record))
        pipe_.expire(key, PREVIEW_TTL_S)
        pipe_.publish(key, self.sent)
        pipe_.execute()
        self.sent += 1


def previewer_for(request: OmniRequest, redis: OmniRedis) -> Previewer | None:
    """The previews `request` asks for, written to `redis` (None when it asks for none)."""
    if request.partial_images <= 0:
        return None
    return Previewer(request.request_id, request.partial_images, redis)
