"""A small route table for the dashboard API: each route declares its input and output models,
who may call it and which errors it answers; one wrapper checks the input, applies the session
and cross-site rules and answers JSON, and the OpenAPI document is generated from the same
declarations (so the document cannot drift from the code)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from pymongo.errors import ConnectionFailure

from services.dashboard.errors import ApiError
from services.dashboard.models import ErrorBody

log = logging.getLogger("zaki.dashboard")

Auth = Literal["none", "user", "operator"]
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_BODY = 256 * 1024


@dataclass
class Ctx:
    """One request as a handler sees it."""

    request: web.Request
    deps: Any
    account: dict[str, Any] | None = None
    session: dict[str, Any] | None = None
    via_cookie: bool = False
    body: Any = None
    query: Any = None
    status: int | None = None  # overrides the route's success status
    cookies: list[tuple[str, str | None, dict[str, Any]]] = field(default_factory=list)

    @property
    def user_id(self) -> str:
        assert self.account is not None
        return self.account["_id"]

    def set_cookie(self, name: str, value: str | None, **opts: Any) -> None:
        """value None: delete the cookie."""
        self.cookies.append((name, value, opts))


Handler = Callable[[Ctx], Awaitable[BaseModel | web.StreamResponse | None]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    fn: Handler
    summary: str
    tag: str
    auth: Auth
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    status: int
    out: type[BaseModel] | None
    errors: tuple[int, ...]
    sse: bool
    raw_body: str | None = None  # a media type: the handler reads (and limits) the body itself


class Api:
    def __init__(self) -> None:
        self.routes: list[Route] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        tag: str,
        auth: Auth = "user",
        body: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None,
        status: int = 200,
        out: type[BaseModel] | None = None,
        errors: tuple[int, ...] = (),
        sse: bool = False,
        raw_body: str | None = None,
    ) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self.routes.append(
                Route(method, path, fn, summary, tag, auth, body, query, status, out, errors, sse, raw_body)
            )
            return fn

        return deco

    def install(
        self,
        app: web.Application,
        deps: Any,
        authenticate: Callable[[Ctx, Auth], Awaitable[None]],
        check_origin: Callable[[Ctx], None],
    ) -> None:
        for r in self.routes:
            app.router.add_route(r.method, r.path, _wrap(r, deps, authenticate, check_origin))

    # --- OpenAPI --------------------------------------------------------------------------------

    def openapi(self, title: str, version: str, description: str) -> dict[str, Any]:
        inputs = {m for r in self.routes for m in (r.body, r.query) if m is not None}
        outputs = {r.out for r in self.routes if r.out is not None} | {ErrorBody}
        pairs = [(m, "validation") for m in inputs] + [(m, "serialization") for m in outputs]
        refs, defs = models_json_schema(pairs, ref_template="#/components/schemas/{model}")
        error_ref = refs[(ErrorBody, "serialization")]
        paths: dict[str, dict[str, Any]] = {}
        for r in self.routes:
            op: dict[str, Any] = {
                "operationId": r.fn.__name__,
                "summary": r.summary,
                "tags": [r.tag],
                "responses": {},
            }
            if r.fn.__doc__:
                op["description"] = " ".join(r.fn.__doc__.split())
            params = [
                {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                for n in re.findall(r"{(\w+)}", r.path)
            ]
            if r.query is not None:
                schema = r.query.model_json_schema()
                for name, prop in schema.get("properties", {}).items():
                    params.append(
                        {
                            "name": name,
                            "in": "query",
                            "required": name in schema.get("required", ()),
                            "schema": prop,
                        }
                    )
            if params:
                op["parameters"] = params
            if r.body is not None:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": refs[(r.body, "validation")]}},
                }
            elif r.raw_body is not None:
                op["requestBody"] = {
                    "required": True,
                    "content": {r.raw_body: {"schema": {"type": "string", "format": "binary"}}},
                }
            if r.sse:
                ok: dict[str, Any] = {
                    "description": "Server-Sent Events",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                }
            elif r.out is None:
                ok = {"description": "done"}
            else:
                ok = {
                    "description": "ok",
                    "content": {"application/json": {"schema": refs[(r.out, "serialization")]}},
                }
            op["responses"][str(r.status)] = ok
            err = {"description": "error", "content": {"application/json": {"schema": error_ref}}}
            statuses = set(r.errors) | {400, 413, 415, 503}
            if r.auth != "none":
                statuses |= {401, 403}
                op["security"] = [{"session": []}, {"bearer": []}]
            for s in sorted(statuses):
                op["responses"][str(s)] = err
            op["responses"]["default"] = err
            paths.setdefault(r.path, {})[r.method.lower()] = op
        return {
            "openapi": "3.1.0",
            "info": {"title": title, "version": version, "description": description},
            "paths": paths,
            "components": {
                "schemas": defs.get("$defs", {}),
                "securitySchemes": {
                    "session": {"type": "apiKey", "in": "cookie", "name": "zaki_dash"},
                    "bearer": {"type": "http", "scheme": "bearer"},
                },
            },
        }


API = Api()


# --- the per-route wrapper ---------------------------------------------------------------------


def _validation_error(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if not isinstance(p, int)]
    where = ".".join(loc)
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    return ApiError(400, "invalid_input", f"{where}: {msg}" if where else msg, loc[0] if loc else None)


def _parse(model: type[BaseModel], data: Any) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


async def _read_body(request: web.Request) -> Any:
    if not request.body_exists:
        return None
    ctype = request.content_type
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None


def _wrap(
    r: Route,
    deps: Any,
    authenticate: Callable[[Ctx, Auth], Awaitable[None]],
    check_origin: Callable[[Ctx], None],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        ctx = Ctx(request, deps)
        try:
            await authenticate(ctx, r.auth)
            if request.method in UNSAFE:
                check_origin(ctx)
            # Session and Origin checked above, before any byte of a raw body is read.
            raw = await _read_body(request) if request.method in UNSAFE and not r.raw_body else None
            if r.body is not None:
                ctx.body = _parse(r.body, {} if raw is None else raw)
            elif raw not in (None, {}):
                raise ApiError(400, "invalid_input", "this request takes no body")
            if r.query is not None:
                ctx.query = _parse(r.query, dict(request.query))
            result = await r.fn(ctx)
        except ApiError as e:
            resp: web.StreamResponse = web.json_response(e.body(), status=e.status, headers=e.headers)
        else:
            if isinstance(result, web.StreamResponse):
                return result  # already sent (SSE); its cookies were applied before prepare()
            status = ctx.status or r.status
            if result is None:
                resp = web.Response(status=status if status != 200 else 204)
            else:
                resp = web.json_response(result.model_dump(mode="json"), status=status)
        apply_cookies(ctx, resp)
        return resp

    handler.__name__ = r.fn.__name__
    return handler


def apply_cookies(ctx: Ctx, resp: web.StreamResponse) -> None:
    for name, value, opts in ctx.cookies:
        if value is None:
            resp.del_cookie(name, path=opts.get("path", "/"), domain=opts.get("domain"))
        else:
            resp.set_cookie(name, value, **opts)
    ctx.cookies.clear()


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(ApiError(status, code, message).body(), status=status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Everything that escapes a route still answers the typed JSON error shape."""
    try:
        return await handler(request)
    except ApiError as e:
        return web.json_response(e.body(), status=e.status, headers=e.headers)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "body_too_large", f"the body is over {MAX_BODY // 1024} KiB")
    except web.HTTPNotFound:
        return _error(404, "not_found", "no such route")
    except web.HTTPMethodNotAllowed as e:
        return _error(405, "method_not_allowed", "method not allowed", {"Allow": ",".join(e.allowed_methods)})
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, "http_error", e.reason)
    except ConnectionFailure:
        log.warning("store unreachable")
        return _error(503, "unavailable", "the platform's database is unreachable; retry shortly")
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return _error(500, "internal_error", "internal error")
