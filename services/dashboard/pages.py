"""The dashboard's pages: static files from ``services/dashboard/static`` (plain ES modules, no
build step), served at ``/`` (index.html) and ``/assets/<path>``, same origin as the API.

Every file is read and gzip-compressed once at start-up (the whole set is ~60 KB raw), answered
with an ETag (revalidated: file names carry no hash) and a strict Content-Security-Policy: scripts,
styles, fetches and EventSource from this origin only, no inline code, no framing."""

from __future__ import annotations

import gzip
import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from shared.settings import ZakiSettings

STATIC = Path(__file__).with_name("static")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
INSTALLED = web.AppKey("dashboard_pages_installed", bool)
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml"}  # fmt: skip


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes | None
    content_type: str
    etag: str


def load(root: Path = STATIC) -> dict[str, Asset]:
    """Every file under root by its relative path; nothing outside root is ever reachable
    because only these names are served."""
    assets: dict[str, Asset] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        body = path.read_bytes()
        ctype = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        packed = gzip.compress(body, 9, mtime=0)
        assets[path.relative_to(root).as_posix()] = Asset(
            body=body,
            gzipped=packed if len(packed) < len(body) else None,
            content_type=ctype,
            etag='"' + hashlib.sha256(body).hexdigest()[:32] + '"',
        )
    return assets


def answer(request: web.Request, asset: Asset) -> web.Response:
    headers = {**SECURITY_HEADERS, "ETag": asset.etag, "Cache-Control": "no-cache", "Vary": "Accept-Encoding"}
    if asset.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    body = asset.body
    if asset.gzipped is not None and "gzip" in request.headers.get("Accept-Encoding", ""):
        body, headers["Content-Encoding"] = asset.gzipped, "gzip"
    headers["Content-Type"] = asset.content_type
    return web.Response(body=body, headers=headers)


def install(app: web.Application, settings: ZakiSettings | None = None, root: Path = STATIC) -> None:
    """Adds the page routes once (a second call, e.g. from __main__ after build_app, is a no-op)."""
    if app.get(INSTALLED):
        return
    app[INSTALLED] = True
    assets = load(root)

    async def index(request: web.Request) -> web.Response:
        return answer(request, assets["index.html"])

    async def asset(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["path"])
        if found is None:
            raise web.HTTPNotFound()
        return answer(request, found)

    async def favicon(request: web.Request) -> web.Response:
        return answer(request, assets["favicon.svg"])

    app.router.add_get("/", index)
    app.router.add_get("/assets/{path:.+}", asset)
    app.router.add_get("/favicon.ico", favicon)
