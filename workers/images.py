"""Images in and out of the diffusion pool: inline base64 in, PNG files out (and the
files of a video: `workers.videos`).

Output files are named by `output_name`: the request id percent-encoded, so an ordinary
id keeps its own name and two different ids never share a file (`rel/collide` is
`rel%2Fcollide.png`, `rel_collide` is `rel_collide.png`): one request's image is never
overwritten by another's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import time
import uuid
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from omni_tasks.errors import RequestValidationError
from omni_tasks.image_input import check_pixels

INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
#: Characters kept as they are in a file name; every other byte becomes %XX.
_NAME_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
#: Longest encoded name kept whole; longer ones end in a digest (file names: 255 bytes).
_MAX_NAME_CHARS = 180


def decode_image(data_b64: str) -> Image.Image:
    """The inline input image of an IMAGE request, as RGB.

    Checked again here, the size from the header before any pixel is decoded: a message
    may not have come through the producer. Raises RequestValidationError naming `image`.
    """
    try:
        raw = base64.b64decode(data_b64, validate=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=INPUT_FORMATS)
    except (binascii.Error, UnidentifiedImageError):
        raise RequestValidationError("image", "is not a PNG, JPEG or WebP image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestValidationError("image", f"is too large to decode ({exc})") from None
    with img:
        try:
            check_pixels(*img.size)
        except ValueError as exc:
            raise RequestValidationError("image", str(exc)) from None
        try:
            return img.convert("RGB")
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise RequestValidationError("image", f"cannot be decoded ({exc})") from None


def png_name(request_id: str) -> str:
    """The file name of a request's image (`output_name`)."""
    return output_name(request_id, "png")


def output_name(request_id: str, suffix: str) -> str:
    """The name of a request's output file with `suffix`: injective in the request id.

    Bytes outside [A-Za-z0-9-_.] (and a leading dot) become %XX, so percent-decoding
    gives the id back and no two ids share a name. A name too long for the filesystem
    keeps its first part and ends in `%~` and the id's SHA-256: `%~` never occurs in an
    encoded name, so the two forms never meet.
    """
    encoded = "".join(
        chr(b) if b in _NAME_SAFE and not (i == 0 and b == ord(".")) else f"%{b:02X}"
        for i, b in enumerate(request_id.encode("utf-8"))
    )
    if len(encoded) > _MAX_NAME_CHARS:
        digest = hashlib.sha256(request_id.encode("utf-8")).hexdigest()
        head = encoded[:64]
        escape = head.rfind("%", len(head) - 2)  # do not cut an escape in two
        encoded = f"{head[:escape] if escape >= 0 else head}%~{digest}"
    return f"{encoded}.{suffix}"


def encode_png(image: Image.Image) -> bytes:
    """The image as PNG bytes: encoded once per computed image, then written, cached
    and shared as they are (an exact repeat encodes nothing)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: Image.Image | bytes, output_dir: Path, request_id: str) -> Path:
    """Write the image (or PNG bytes already encoded: `encode_png`) as `save_output`."""
    data = image if isinstance(image, bytes) else encode_png(image)
    return save_output(data, output_dir, request_id, "png")


def save_output(data: bytes, output_dir: Path, request_id: str, suffix: str) -> Path:
    """Write a request's output file under a dated folder of `output_dir`, atomically
    (temp file then rename): readers never see half a file."""
    folder = Path(output_dir).expanduser() / time.strftime("%Y%m%d")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / output_name(request_id, suffix)
    tmp = folder / f".{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.resolve()
