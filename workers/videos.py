"""The files of a video result: an MP4, its thumbnail and a spritesheet.

- The MP4 is H.264 (libx264 through PyAV, whose wheels carry FFmpeg), yuv420p, with
  its index at the front (`faststart`), so browsers and players stream it as it
  downloads. Encoding is deterministic: the same frames give the same bytes.
- The thumbnail is the first frame as a PNG (what an image request would give).
- The spritesheet is a JPEG grid of frames spread evenly over the video, each scaled to
  at most `SPRITE_WIDTH` pixels wide (OpenAI's `variant=spritesheet`).

All three are encoded once per computed video; the DiT cache keeps their bytes beside
the final latents, so an exact repeat returns the same files without decoding.
"""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from workers.images import encode_png

if TYPE_CHECKING:
    import numpy as np

#: libx264's constant rate factor: 18 is visually lossless for most content.
CRF = 18
SPRITE_FRAMES = 9
SPRITE_WIDTH = 160
#: The suffixes of a video's files, as `Rendered.files` keys them.
VIDEO, THUMBNAIL, SPRITESHEET = "mp4", "png", "jpg"


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """(frames, height, width, 3) uint8 frames as an H.264 MP4 at `fps`."""
    # `faststart` rewrites the file once written, which needs a real file.
    with tempfile.TemporaryDirectory(prefix="omni-mp4-") as folder:
        path = Path(folder) / "video.mp4"
        _write_mp4(path, frames, fps)
        return path.read_bytes()


def _write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    import av

    count, height, width, _ = frames.shape
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        # One thread: x264's frame threads make no difference to tiny frames, and one
        # encoder thread per request keeps the worker's cores for the step loop. No
        # macroblock tree: with it, x264 gave the same frames different bytes now and
        # then (1 encode in 8 of a 9-frame clip), and the same frames must give the same
        # file (cached results, comparisons); it costs a few percent of size at this CRF.
        stream.codec_context.options = {
            "crf": str(CRF),
            "threads": "1",
            "x264-params": "mbtree=0",
        }
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(frames[index], format="rgb24")
            frame.pts = index  # in 1/fps: set, not guessed, so the same frames give the same bytes
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def spritesheet(frames: np.ndarray) -> bytes:
    """A JPEG grid of up to `SPRITE_FRAMES` frames spread over the video."""
    from PIL import Image

    count = len(frames)
    shown = min(count, SPRITE_FRAMES)
    picks = [round(i * (count - 1) / max(shown - 1, 1)) for i in range(shown)]
    height, width = frames.shape[1:3]
    scale = min(1.0, SPRITE_WIDTH / width)
    cell = (max(1, round(width * scale)), max(1, round(height * scale)))
    cols = math.ceil(math.sqrt(shown))
    rows = math.ceil(shown / cols)
    sheet = Image.new("RGB", (cols * cell[0], rows * cell[1]))
    for slot, index in enumerate(picks):
        tile = Image.fromarray(frames[index]).resize(cell)
        sheet.paste(tile, ((slot % cols) * cell[0], (slot // cols) * cell[1]))
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def video_files(frames: np.ndarray, fps: int) -> dict[str, bytes]:
    """A video's files by suffix: the MP4, the thumbnail PNG, the spritesheet JPEG."""
    from PIL import Image

    return {
        VIDEO: encode_mp4(frames, fps),
        THUMBNAIL: encode_png(Image.fromarray(frames[0])),
        SPRITESHEET: spritesheet(frames),
    }


def decode_mp4(data: bytes) -> tuple[np.ndarray, float]:
    """An MP4's frames, (frames, height, width, 3) uint8, and its frame rate."""
    import av
    import numpy as np

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or 0)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return np.stack(frames), rate
