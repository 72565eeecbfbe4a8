"""Input images of IMAGE requests: inline bytes only, checked without decoding them.

A message carries its input image inline (base64, or a `data:` URL). Nothing here reads
a file: a path in a message would let any client probe which files exist on a worker.
The size is read from the PNG, JPEG or WebP header (no Pillow on the producer side), so
a decompression bomb is refused before any worker allocates its pixels.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from pathlib import Path

MAX_IMAGE_BYTES = 16 * 1024 * 1024
#: Most pixels an input image may have (16 MP: 8x the largest output, 2048x2048).
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")  # PNG, JPEG, WebP
_PATH_LIKE = re.compile(r"^(~|\.{1,2}/|/|[A-Za-z]:\\)|[\\]|\.(png|jpe?g|webp|gif|bmp)$", re.I)
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
PATH_REFUSED = (
    "file paths are not accepted (a worker never reads files named in a message); "
    "send the image inline: base64, a data: URL, or encode_image_file(path)"
)


def encode_image_file(path: str | Path) -> str:
    """Read an image file in the caller's own process, as the base64 an IMAGE request takes."""
    return base64.b64encode(Path(path).expanduser().read_bytes()).decode("ascii")


def inline_image_b64(value: str | bytes) -> str:
    """The canonical base64 of an inline PNG/JPEG/WebP image, or ValueError saying why not.

    Takes raw bytes, base64 text or a `data:<type>;base64,` URL.
    """
    raw = value if isinstance(value, bytes) else _decode_text(value)
    if len(raw) > MAX_IMAGE_BYTES:
        raise ValueError(f"is {len(raw)} bytes; at most {MAX_IMAGE_BYTES}")
    if not raw.startswith(IMAGE_MAGIC):
        raise ValueError("is not a PNG, JPEG or WebP image")
    width, height = image_size(raw)
    check_pixels(width, height)
    return base64.b64encode(raw).decode("ascii")


def check_pixels(width: int, height: int) -> None:
    """Refuse an empty image or one over `MAX_IMAGE_PIXELS` (a decompression bomb)."""
    if width < 1 or height < 1:
        raise ValueError(f"has an empty size ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} (decompression bomb?)"
        )


def _decode_text(value: str) -> bytes:
    text = value.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ValueError("a data: URL must be base64 (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = None
    if raw is not None and raw.startswith(IMAGE_MAGIC):
        return raw
    if len(text) < 4096 and (_PATH_LIKE.search(text) or (raw is None and "/" in text)):
        raise ValueError(PATH_REFUSED)
    if raw is None:
        raise ValueError("must be base64 image data or a data: URL")
    return raw


def image_size(raw: bytes) -> tuple[int, int]:
    """(width, height) from the header of a PNG, JPEG or WebP image."""
    try:
        if raw.startswith(b"\x89PNG") and raw[12:16] == b"IHDR":
            return struct.unpack(">II", raw[16:24])
        if raw.startswith(b"\xff\xd8"):
            return _jpeg_size(raw)
        if raw.startswith(b"RIFF") and raw[8:12] == b"WEBP":
            return _webp_size(raw)
    except (struct.error, IndexError):
        pass
    raise ValueError("is not a readable PNG, JPEG or WebP image (bad header)")


def _jpeg_size(raw: bytes) -> tuple[int, int]:
    pos = 2
    while pos + 4 <= len(raw):
        if raw[pos] != 0xFF:
            raise IndexError("not at a marker")
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker == 0xDA:  # scan data before any frame header
            break
        (length,) = struct.unpack(">H", raw[pos + 2 : pos + 4])
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", raw[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    raise IndexError("no frame header")


def _webp_size(raw: bytes) -> tuple[int, int]:
    chunk = raw[12:16]
    if chunk == b"VP8 " and raw[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", raw[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and raw[20] == 0x2F:
        (bits,) = struct.unpack("<I", raw[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(raw[24:27], "little") + 1
        height = int.from_bytes(raw[27:30], "little") + 1
        return width, height
    raise IndexError("unknown WebP chunk")
