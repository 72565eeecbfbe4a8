"""Images and sounds out of the API: the PNGs the diffusion workers write under
`output_dir`, as bytes in the requested format, or as a URL to `GET /v1/files/{name}`;
the audio files of speech and audio requests, as they are.

The API must see the workers' `output_dir` (one machine, or a shared volume as in
docker-compose.yml). `GET /v1/files/{name}` serves only images and audio files under
it: a relative name, no hidden part, no `..`, resolved (links too) inside the folder. A
`.webp` or `.jpeg` name is the `.png` of the same name, converted on the way out.
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from fastapi import APIRouter, Request, Response

from omni_tasks.api.context import config_of
from omni_tasks.api.errors import APIError
from omni_tasks.audio_fields import AUDIO_FORMATS, MEDIA_TYPES
from omni_tasks.config import CoreModuleConfig

#: Output format -> (Pillow's name, media type).
FORMATS = {
    "png": ("PNG", "image/png"),
    "webp": ("WEBP", "image/webp"),
    "jpeg": ("JPEG", "image/jpeg"),
}
SUFFIXES = {".png": "png", ".webp": "webp", ".jpeg": "jpeg", ".jpg": "jpeg"}
#: Audio files are served as the workers wrote them.
AUDIO_SUFFIXES = {f".{fmt}": fmt for fmt in AUDIO_FORMATS}

router = APIRouter()


def output_root(config: CoreModuleConfig) -> Path:
    """The workers' `output_dir` as this API sees it (a shared volume)."""
    return config.output_path().resolve()


def image_name(image_path: str, root: Path) -> str:
    """The name under `output_dir` (`root`) of a worker's image (what `/v1/files/` takes)."""
    try:
        return Path(image_path).resolve().relative_to(root).as_posix()
    except ValueError:
        raise APIError(
            500,
            "the image is not under this API's output_dir: give the API and the diffusion "
            "workers the same output_dir (a shared volume)",
            code="image_unreachable",
        ) from None


def audio_url(base_url: str, audio_path: str, root: Path) -> str | None:
    """The URL of a worker's audio file, or None when it is not under `output_dir`
    (`root`)."""
    try:
        name = Path(audio_path).resolve().relative_to(root).as_posix()
    except ValueError:
        return None
    return f"{base_url.rstrip('/')}/v1/files/{quote(name)}"


def file_url(base_url: str, name: str, output_format: str) -> str:
    """The URL of image `name` (a `.png` under output_dir) in `output_format`."""
    stem = name[: -len(".png")] if name.endswith(".png") else name
    return f"{base_url.rstrip('/')}/v1/files/{quote(stem)}.{output_format}"


def base_url_of(request: Request) -> str:
    """Where clients reach this API: `api.public_url`, else the URL the request came to."""
    return config_of(request).api.public_url or str(request.base_url)


def encode(png: bytes, output_format: str, compression: int | None = None) -> bytes:
    """`png` as `output_format` (PNG unchanged); `compression` 0-100 for WebP/JPEG."""
    if output_format == "png":
        return png
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        out = io.BytesIO()
        quality = 100 - compression if compression is not None else 90
        img.convert("RGB").save(out, format=FORMATS[output_format][0], quality=max(quality, 1))
        return out.getvalue()


def read_image(image_path: str, output_format: str, compression: int | None = None) -> bytes:
    """The bytes of a worker's image in `output_format` (blocking: run it in a thread)."""
    path = Path(image_path)
    try:
        png = path.read_bytes()
    except OSError as exc:
        raise APIError(
            500, f"cannot read the image {path.name}: {exc.strerror}", code="image_unreachable"
        ) from None
    return encode(png, output_format, compression)


async def image_b64(image_path: str, output_format: str, compression: int | None = None) -> str:
    data = await asyncio.to_thread(read_image, image_path, output_format, compression)
    return base64.b64encode(data).decode("ascii")


def resolve(name: str, config: CoreModuleConfig) -> tuple[Path, str]:
    """(the PNG under output_dir, the format asked for) of a `/v1/files/` name, or 404."""
    missing = APIError(404, f"no image {name!r}", param="name", code="file_not_found")
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or "\\" in name:
        raise missing
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise missing
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in SUFFIXES and suffix not in AUDIO_SUFFIXES:
        raise missing
    root = output_root(config)
    png = root / name
    if suffix in SUFFIXES:
        png = (root / name[: -len(suffix)]).with_name(PurePosixPath(name).stem + ".png")
    try:
        resolved = png.resolve(strict=True)
        resolved.relative_to(root)
    except (OSError, ValueError):
        raise missing from None
    if not resolved.is_file():
        raise missing
    return resolved, SUFFIXES.get(suffix) or AUDIO_SUFFIXES[suffix]


@router.get("/v1/files/{name:path}")
async def get_file(name: str, request: Request) -> Response:
    """An image under output_dir (PNG, or converted to the suffix's format), or an audio
    file as it is."""
    path, output_format = resolve(name, config_of(request))
    if output_format in MEDIA_TYPES:
        data = await asyncio.to_thread(path.read_bytes)
        return Response(data, media_type=MEDIA_TYPES[output_format])
    data = await asyncio.to_thread(read_image, str(path), output_format)
    return Response(data, media_type=FORMATS[output_format][1])
