"""The dashboard's own origin for the browser tests, as a reverse proxy in front of it would serve
it: its pages and API (`/`, `/assets/…`, `/api/…`) and nothing else. The gateway proxy is NOT merged
in (`/v1/…`, `/ui/…` answer 404 here): it lives on its own origin, because it serves content the
tenant controls (security review H4), so the tests prove the pages work without it. Streams both
ways (SSE), passes cookies and Origin untouched."""

from __future__ import annotations

from aiohttp import ClientSession, DummyCookieJar, web

from shared.http import HOP_BY_HOP

DASHBOARD_PREFIXES = ("/api/", "/assets/")


def _to_dashboard(path: str) -> bool:
    return path == "/" or path.startswith(DASHBOARD_PREFIXES) or path == "/favicon.ico"


class Front:
    def __init__(self, dashboard: str) -> None:
        self.dashboard = dashboard
        self.http: ClientSession | None = None
        self.runner: web.AppRunner | None = None

    async def start(self, port: int) -> str:
        self.http = ClientSession(cookie_jar=DummyCookieJar(), auto_decompress=False)
        app = web.Application(client_max_size=4 << 20)
        app.router.add_route("*", "/{tail:.*}", self.relay)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)  # open SSE relays
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"

    async def relay(self, request: web.Request) -> web.StreamResponse:
        assert self.http is not None
        if not _to_dashboard(request.path):
            return web.json_response({"error": {"code": "not_found", "message": "no such route"}}, status=404)
        base = self.dashboard
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
        headers["X-Forwarded-For"] = request.remote or "127.0.0.1"
        body = await request.read()
        async with self.http.request(
            request.method,
            base + request.rel_url.raw_path_qs,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in HOP_BY_HOP | {"content-length"}:
                    resp.headers.add(k, v)
            if up.headers.get("Content-Length") and "Content-Encoding" not in up.headers:
                resp.content_length = int(up.headers["Content-Length"])
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def close(self) -> None:
        if self.runner:
            await self.runner.cleanup()
        if self.http:
            await self.http.close()
