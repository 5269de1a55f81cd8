"""The dashboard's vendored static files (CSS, JavaScript), served from the package so the pages
work offline and behind any proxy. URLs carry a digest of the files, so a new release is never
mixed with an old cached script."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi.responses import FileResponse

from service.errors import NotFound

STATIC_DIR = Path(__file__).parent / "static"
PREFIX = "/dashboard/static"
_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
# Only the files shipped with the package can be asked for: no path from a request reaches the disk.
FILES = {p.name: p for p in sorted(STATIC_DIR.iterdir()) if p.is_file() and p.suffix in _TYPES}
DIGEST = hashlib.sha256(b"".join(p.read_bytes() for p in FILES.values())).hexdigest()[:12]


def url(name: str) -> str:
    """The URL of a static file, for templates."""
    if name not in FILES:
        raise KeyError(f"no static file {name!r} in {STATIC_DIR}")
    return f"{PREFIX}/{name}?v={DIGEST}"


def response(name: str) -> FileResponse:
    path = FILES.get(name)
    if path is None:
        raise NotFound(f"no dashboard file {name!r}")
    return FileResponse(
        path, media_type=_TYPES[path.suffix], headers={"Cache-Control": "public, max-age=604800, immutable"}
    )
