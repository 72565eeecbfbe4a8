"""The fields of a video request (`RequestType.VIDEO`) that need more than a bound.

A video is `num_frames` frames played at `fps`. Wan's causal VAE keeps the first frame
and compresses the rest 4x in time, so a frame count is 4k+1 (5, 9, ..., 81). A caller
gives either:

- `num_frames`: refused unless it is 4k+1 (the error names the two nearest counts);
- `seconds` (with `fps`): rounded to the nearest 4k+1 frame count (halfway: up), at
  least 1; the request then carries `num_frames` and not `seconds`, so the same video
  asked both ways is the same request.

Neither: `DEFAULT_FRAMES`. `guidance_scale` (diffusers' name) is taken for `guidance`.
"""

from __future__ import annotations

import math
from typing import Any

from omni_tasks.audio_fields import is_audio

#: Frame counts are FRAME_STEP * k + 1 (the temporal compression of Wan's VAE).
FRAME_STEP = 4
DEFAULT_FRAMES = 17
MAX_FRAMES = 257
DEFAULT_FPS = 16  # Wan 2.1's
MAX_FPS = 60
VIDEO = "video"


def nearest_frames(frames: float) -> int:
    """The 4k+1 frame count nearest `frames` (at least 1; halfway: the longer)."""
    k = max(math.floor((frames - 1) / FRAME_STEP + 0.5), 0)
    return FRAME_STEP * k + 1


def frames_problem(frames: int) -> str | None:
    """Why `frames` is not a frame count a video model takes, or None."""
    if (frames - 1) % FRAME_STEP == 0:
        return None
    below = (frames - 1) // FRAME_STEP * FRAME_STEP + 1
    return f"must be {FRAME_STEP}k+1 (the video VAE's frames), e.g. {below} or {below + FRAME_STEP}"


def video_aliases(data: dict[str, Any]) -> dict[str, Any]:
    """`seconds` turned into `num_frames`, `guidance_scale` into `guidance`, and the
    default frame count filled in, for a VIDEO request's raw fields (a copy). Raises
    ValueError ("field: reason") for what cannot be turned."""
    kind = data.get("request_type")
    video = getattr(kind, "value", kind) == VIDEO
    data = dict(data)
    if "guidance_scale" in data:
        if "guidance" in data:
            raise ValueError("guidance_scale: give guidance or guidance_scale, not both")
        data["guidance"] = data.pop("guidance_scale")
    if "seconds" in data and not is_audio(data):  # a sound's length is its own field
        if not video:
            raise ValueError("seconds: only video and audio requests take it")
        if "num_frames" in data:
            raise ValueError("seconds: give num_frames or seconds, not both")
        data["num_frames"] = frames_for(data.pop("seconds"), data.get("fps", DEFAULT_FPS))
    if video and data.get("num_frames") is None:
        data["num_frames"] = DEFAULT_FRAMES
    return data


def frames_for(seconds: Any, fps: Any) -> int:
    """The frame count of `seconds` at `fps` (checked here: they arrive unvalidated)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValueError(f"seconds: must be a number, got {type(seconds).__name__}")
    if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= MAX_FPS:
        raise ValueError(f"fps: must be an integer from 1 to {MAX_FPS}")
    if not 0 < seconds <= MAX_FRAMES / fps:
        raise ValueError(f"seconds: must be above 0 and at most {MAX_FRAMES / fps:g} at {fps} fps")
    return min(nearest_frames(seconds * fps), MAX_FRAMES)
