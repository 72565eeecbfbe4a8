"""Images in and out of the diffusion pool: base64 in, PNG files out."""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

from PIL import Image


def decode_image(data_b64: str) -> Image.Image:
    """The validated base64 payload of an IMAGE request, as RGB."""
    with Image.open(io.BytesIO(base64.b64decode(data_b64))) as img:
        return img.convert("RGB")


def save_png(image: Image.Image, output_dir: Path, request_id: str) -> Path:
    """Write atomically (temp file then rename): readers never see half a PNG."""
    folder = Path(output_dir).expanduser() / time.strftime("%Y%m%d")
    folder.mkdir(parents=True, exist_ok=True)
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in request_id)
    path = folder / f"{safe_id}.png"
    tmp = folder / f".{safe_id}.{os.getpid()}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path.resolve()
