"""A video's files (`workers.videos`): an H.264 MP4 that PyAV decodes back to the frames
(within the codec's rounding) at its frame rate, the same bytes for the same frames, a
PNG thumbnail of the first frame and a JPEG spritesheet."""

from __future__ import annotations

import io

import av
import numpy as np
from PIL import Image

from workers.videos import SPRITE_FRAMES, decode_mp4, encode_mp4, spritesheet, video_files


def frames(count: int = 9, height: int = 48, width: int = 64) -> np.ndarray:
    """A moving gradient: every frame differs, so frame order is checked too."""
    y, x = np.mgrid[0:height, 0:width]
    out = [np.stack([x * 3 + t * 8, y * 4, np.full_like(x, t * 20)], axis=-1) for t in range(count)]
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def test_the_mp4_is_h264_and_decodes_to_the_frames() -> None:
    video = frames()
    data = encode_mp4(video, fps=12)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
    decoded, rate = decode_mp4(data)
    assert decoded.shape == video.shape and rate == 12
    error = np.abs(decoded.astype(int) - video.astype(int))
    assert error.mean() < 2.0 and error.max() <= 12  # 4:2:0 chroma, CRF 18


def test_the_same_frames_give_the_same_bytes() -> None:
    assert encode_mp4(frames(), 16) == encode_mp4(frames(), 16)
    assert encode_mp4(frames(), 16) != encode_mp4(frames(), 8)


def test_the_files_of_a_video() -> None:
    video = frames(count=17)
    files = video_files(video, 16)
    assert set(files) == {"mp4", "png", "jpg"}
    thumbnail = np.asarray(Image.open(io.BytesIO(files["png"])))
    assert np.array_equal(thumbnail, video[0])
    sheet = Image.open(io.BytesIO(files["jpg"]))
    assert sheet.format == "JPEG" and sheet.size == (3 * 64, 3 * 48)  # 9 frames, 3 x 3


def test_a_short_video_has_a_smaller_spritesheet() -> None:
    sheet = Image.open(io.BytesIO(spritesheet(frames(count=2))))
    assert sheet.size == (2 * 64, 48) and SPRITE_FRAMES == 9
