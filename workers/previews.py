"""Previews of a running image request: its intermediate latents, decoded at a few step
boundaries and published through Redis, where the HTTP API (a separate, stateless
process) streams them (`stream: true` with `partial_images`).

A request asks for up to `MAX_PARTIAL_IMAGES` (`OmniRequest.partial_images`). They are
taken at step boundaries spread evenly over its denoising steps, never after the last
(the final image follows). Each is the pipeline's own decode (unpack, scaling and shift,
`vae.decode`, postprocessing) of the latents of that step, run on the engine's device
thread like every other device call. It is then written as PNG base64 to a Redis list
(`keys.previews`, with a TTL) and announced on the channel of the same name.

The step callback of the Flux pipelines calls `step_ended` (`workers.engines.flux.hooks`);
the request's task thread sets what it wants with `previewing`. A preview that fails is
logged and skipped: it never fails the request.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from omni_tasks.coordination import keys
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.outage import Outage
from omni_tasks.requests import MAX_PARTIAL_IMAGES, OmniRequest

log = logging.getLogger(__name__)
_outage = Outage("previews", log)
#: How long a request's previews stay readable after the last one was written.
PREVIEW_TTL_S = 600
#: Runs a device call on the thread that drives the device; by default, here.
RunOn = Callable[[Callable[[], Any]], Any]


def preview_steps(count: int, total: int) -> list[int]:
    """The steps (1-based, each < `total`) after which the `count` previews are taken:
    spread evenly, so a preview shows the image at 1/(count+1), 2/(count+1), ..."""
    count = max(0, min(count, MAX_PARTIAL_IMAGES))
    steps = {round((i + 1) * total / (count + 1)) for i in range(count)}
    return sorted(s for s in steps if 1 <= s < total)


@dataclass
class Previewer:
    """The previews one request wants; `run_on` runs its decodes on the device's thread."""

    request_id: str
    count: int
    width: int
    height: int
    run_on: RunOn | None = None
    sent: int = 0
    _steps: list[int] | None = field(default=None, repr=False)

    def due(self, step: int, total: int) -> bool:
        """Whether a preview is taken once step `step` (1-based) of `total` has ended."""
        if self._steps is None:
            self._steps = preview_steps(self.count, total)
        return step in self._steps

    def publish(self, pipe: Any, latents: Any, step: int, total: int) -> None:
        """Decode `latents` (packed, as the pipeline's loop holds them) and publish them."""
        from workers.engines.flux.phases import decode

        unpacked = type(pipe)._unpack_latents(
            latents, self.height, self.width, pipe.vae_scale_factor
        )
        run_on = self.run_on or (lambda fn: fn())
        image = run_on(lambda: decode(pipe, unpacked))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        record = {
            "index": self.sent,
            "step": step,
            "steps": total,
            "b64_png": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "time": time.time(),
        }
        key = keys.previews(self.request_id)
        pipe_ = get_redis().pipeline(transaction=True)
        pipe_.rpush(key, json.dumps(record))
        pipe_.expire(key, PREVIEW_TTL_S)
        pipe_.publish(key, self.sent)
        pipe_.execute()
        self.sent += 1


class _Current(threading.local):
    previewer: Previewer | None = None


_current = _Current()


@contextmanager
def previewing(request: OmniRequest, run_on: RunOn | None = None) -> Iterator[Previewer | None]:
    """Take the previews `request` asks for while this (its task's) thread runs it;
    nothing when it asks for none. `run_on`: default, the diffusion engine's step loop."""
    if request.partial_images <= 0:
        yield None
        return
    if run_on is None:
        from workers.runtime import runtime

        loop = getattr(runtime.diffusion_engine(), "loop", None)
        run_on = getattr(loop, "run", None)
    outer = _current.previewer
    previewer = Previewer(
        request.request_id, request.partial_images, request.width, request.height, run_on
    )
    _current.previewer = previewer
    try:
        yield previewer
    finally:
        _current.previewer = outer


def step_ended(pipe: Any, index: int, tensors: dict[str, Any]) -> None:
    """The pipeline's step `index` (0-based) has ended with `tensors`: publish a preview
    if the request running in this thread wants one now. Never raises."""
    previewer = _current.previewer
    if previewer is not None:  # previews are advisory: never fail the request over one
        _outage.run(_publish_if_due, previewer, pipe, index, tensors)


def _publish_if_due(previewer: Previewer, pipe: Any, index: int, tensors: dict[str, Any]) -> None:
    total = int(getattr(pipe, "num_timesteps", 0) or 0)
    latents = tensors.get("latents")
    if latents is not None and previewer.due(index + 1, total):
        previewer.publish(pipe, latents, index + 1, total)
