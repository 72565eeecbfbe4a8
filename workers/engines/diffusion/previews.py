"""Previews of a running request: the latents of the steps its ticket's sink wants,
decoded by the family on the device's thread and handed to the sink (which publishes
them: `workers.previews`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from workers.engines.base import ImageParams
from workers.engines.diffusion.hooks import LatentsObserver
from workers.stepping.loop import StepLoop
from workers.stepping.request import StepTicket

if TYPE_CHECKING:
    from workers.engines.families.base import ModelFamily

log = logging.getLogger(__name__)


def previewer(
    family: ModelFamily, loop: StepLoop, ticket: StepTicket, params: ImageParams
) -> LatentsObserver | None:
    """Decodes the step latents the ticket's preview sink wants (on the device's thread)
    and hands them over; a preview that fails is logged and skipped."""
    sink = ticket.preview
    if sink is None or not family.previews:
        return None

    def on_latents(step: int, total: int, latents: Any) -> None:
        if not sink.due(step, total):
            return
        try:
            image = loop.run(lambda: family.preview(latents, params))
        except Exception:  # noqa: BLE001 - advisory: never fail the request over one
            log.warning("%s: preview at step %d failed", ticket.request_id, step, exc_info=True)
            return
        sink.publish(image, step, total)

    return on_latents
