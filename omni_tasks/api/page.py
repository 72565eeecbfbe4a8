"""The playground and operations page (`GET /`): plain HTML, CSS and JavaScript modules
from the package (`omni_tasks/api/static/`), no build step and no CDN.

The page itself holds nothing from the cluster, so it is served without the token (as
are its files under `ui/`); every call it makes for data carries the token, which the
page asks for once and keeps for the tab. Its answers carry a strict
Content-Security-Policy: only this origin's scripts, styles and connections (no inline
code), images and media from this origin or from blobs the page made of fetched files,
and no framing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from omni_tasks.api.errors import APIError

router = APIRouter()

STATIC = Path(__file__).parent / "static"
#: The page's files by suffix (nothing else is served from the folder).
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "media-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "frame-ancestors 'none'",
        "base-uri 'self'",
        "form-action 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
#: Paths the bearer token does not guard: the page and its files.
PAGE_PATH = "/"
PAGE_PREFIX = "/ui/"


def is_page_path(path: str) -> bool:
    return path == PAGE_PATH or path.startswith(PAGE_PREFIX)


def _file(name: str) -> Response:
    path = (STATIC / name).resolve()
    media = MEDIA_TYPES.get(path.suffix)
    if media is None or path.parent != STATIC.resolve() or not path.is_file():
        raise APIError(404, f"no page file {name!r}", code="file_not_found")
    return Response(path.read_bytes(), media_type=media, headers=HEADERS)


@router.get(PAGE_PATH, include_in_schema=False)
async def page() -> Response:
    return _file("index.html")


@router.get(PAGE_PREFIX + "{name}", include_in_schema=False)
async def page_file(name: str) -> Response:
    return _file(name)
