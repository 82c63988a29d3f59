"""One API request's life on the raw data plane: checks, the upstream call, the answer
streamed back (SSE included), with backpressure both ways."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from services.gateway_proxy.auth import AuthError, Tenant, check_cookie_origin
from services.gateway_proxy.decision import STRIPPED_REQUEST, STRIPPED_RESPONSE, gateway_headers
from services.gateway_proxy.errors import REASONS, error_bytes, not_running
from services.gateway_proxy.observe import (
    BYTES_IN,
    BYTES_OUT,
    LATENCY,
    REJECTED,
    REQUESTS,
    UPSTREAM_LATENCY,
    child,
)
from services.gateway_proxy.raw_request import RawRequest
from services.gateway_proxy.routing import NoRoute, Route
from services.gateway_proxy.state import ProxyState
from services.gateway_proxy.upstream_pool import UpstreamConnection, UpstreamPool
from services.gateway_proxy.wake import ACTIVITY

log = logging.getLogger("zaki.proxy")

# Expect is answered by the client connection (the whole body is read before the gateway is called).
_STRIPPED_REQUEST = {h.encode() for h in STRIPPED_REQUEST} | {b"expect"}
_STRIPPED_RESPONSE = {h.encode() for h in STRIPPED_RESPONSE}


class ExchangeClient(Protocol):
    """The client connection an exchange answers on (http_plane.ClientConnection)."""

    state: ProxyState
    pool: UpstreamPool
    transport: asyncio.Transport
    closed: bool
    remote: str

    def finished(self, keep_alive: bool) -> None: ...


class Exchange:
    """One request's life: checks, the upstream call, the answer streamed back."""

    __slots__ = (
        "chunked",
        "client",
        "done",
        "headers_sent",
        "keep_alive",
        "last_data",
        "req",
        "retried",
        "route",
        "status",
        "t_up",
        "tenant",
        "up",
    )

    def __init__(self, client: ExchangeClient, req: RawRequest) -> None:
        self.client = client
        self.req = req
        self.up: UpstreamConnection | None = None
        self.tenant: Tenant | None = None
        self.status = 0
        self.headers_sent = False
        self.chunked = False
        self.done = False
        self.keep_alive = req.keep_alive
        self.last_data = 0.0
        self.t_up = 0.0
        self.route: Route | None = None
        self.retried = False

    # --- checks -------------------------------------------------------------------------------------

    def start(self) -> None:
        state = self.client.state
        try:
            credential = self._credential()
            tenant = state.auth.authenticate_cached(credential)
        except AuthError as e:
            self._refuse(e.status, e.code, str(e))
            return
        if tenant is None:  # not cached: ask the store
            asyncio.get_running_loop().create_task(self._authenticate(credential))
            return
        self._authorized(tenant)

    def _credential(self) -> str | None:
        req = self.req
        credential, source = req.credential()
        if source == "cookie":
            check_cookie_origin(req.method, req.header(b"origin"), False, self.client.state.allowed_origins)
        return credential

    async def _authenticate(self, credential: str | None) -> None:
        try:
            tenant = await self.client.state.auth.authenticate(credential)
        except AuthError as e:
            self._refuse(e.status, e.code, str(e))
            return
        except Exception:
            log.exception("authentication failed", extra={"request_id": self.req.rid})
            self._answer_error(500, "internal_error", "internal error")
            return
        self._authorized(tenant)

    def _authorized(self, tenant: Tenant) -> None:
        self.tenant = tenant
        state = self.client.state
        if self.req.scope not in tenant.scopes:
            self._refuse(403, "insufficient_scope", f"this credential lacks the '{self.req.scope}' scope")
            return
        wait = state.limits.take(tenant.user_id)
        if wait:
            REJECTED.labels("rate_limited").inc()
            self._answer_error(
                429,
                "rate_limit_exceeded",
                "too many requests",
                headers={"Retry-After": str(max(1, round(wait)))},
            )
            return
        route = state.routes.routes.get(tenant.user_id)
        if route is not None:
            up = self.client.pool.idle(route)
            if up is not None:  # the common case, with no task and no await
                self.route = route
                self._send(up, route)
                return
        asyncio.get_running_loop().create_task(self._forward(route))

    def _refuse(self, status: int, code: str, message: str) -> None:
        REJECTED.labels(code).inc()
        self._answer_error(status, code, message)

    def _not_running(self, state: str | None) -> None:
        REJECTED.labels("instance_not_running").inc()
        message, extra, headers = not_running(state)
        self._answer_error(503, "instance_not_running", message, extra, headers)

    def _answer_error(
        self,
        status: int,
        code: str,
        message: str,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        c = self.client
        if not c.closed:
            close = not self.keep_alive
            c.transport.write(
                error_bytes(status, self.req.path, code, message, self.req.rid, extra, headers, close)
            )
        self.status = status
        self._finish()

    # --- the upstream call --------------------------------------------------------------------------

    async def _forward(self, route: Route | None) -> None:
        state = self.client.state
        assert self.tenant is not None
        if route is None:
            try:
                route = await state.routes.resolve(self.tenant.user_id)
            except NoRoute as e:
                self._not_running(e.state)
                return
        if self.route is None:  # in flight until _finish: a long stream keeps its gateway awake
            ACTIVITY.opened(self.tenant.user_id)
        self.route = route
        try:
            up = await self.client.pool.get(route, fresh=self.retried)
        except (OSError, TimeoutError):
            # It just stopped, sleeps, or Docker is restarting it: the record says; a gateway on
            # its way back is waited for (bounded, services/gateway_proxy/wake.py), once.
            try:
                route = await state.routes.recover(self.tenant.user_id, route)
                up = await self.client.pool.get(route, fresh=True)
            except NoRoute as e:
                self._not_running(e.state)
                return
            except (OSError, TimeoutError):
                self._answer_error(502, "gateway_unreachable", "your gateway did not answer")
                return
        if self.client.closed:
            self.client.pool.release(up)
            self._finish()
            return
        self._send(up, route)

    def _send(self, up: UpstreamConnection, route: Route) -> None:
        req = self.req
        assert self.tenant is not None
        self.up = up
        up.exchange = self
        body = b"".join(req.body)
        BYTES_IN.inc(len(body))
        assert req.decision is not None
        # The normalised path (and the client's query): what the proxy routed on.
        lines = [req.method.encode() + b" " + req.decision.target.encode() + b" HTTP/1.1\r\n"]
        for k, lk, v in req.headers:
            if lk not in _STRIPPED_REQUEST:
                lines.append(k + b": " + v + b"\r\n")
        host = req.header(b"host") or ""
        ident = gateway_headers(req.decision, self.tenant.user_id, self.client.remote, "http", host, req.rid)
        for k, v in ident.items():
            lines.append(f"{k}: {v}\r\n".encode("latin-1"))
        lines.append(
            b"Host: %s:%d\r\nContent-Length: %d\r\n\r\n" % (route.host.encode(), route.port, len(body))
        )
        self.t_up = self.last_data = time.perf_counter()
        up.transport.write(b"".join(lines) + body)

    # --- the answer ----------------------------------------------------------------------------------

    def response_head(self, status: int, headers: list[tuple[bytes, bytes]], has_length: bool) -> None:
        self.last_data = time.perf_counter()
        child(UPSTREAM_LATENCY, self.req.route).observe(self.last_data - self.t_up)
        self.status = status
        # 1xx, 204 and 304 answers have no body, hence no framing either.
        self.chunked = not has_length and status >= 200 and status not in (204, 304)
        out = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b""))]
        for k, v in headers:
            lk = k.lower()
            if lk in _STRIPPED_RESPONSE and not (lk == b"content-length" and has_length):
                continue
            out.append(k + b": " + v + b"\r\n")
        out.append(b"X-Request-Id: " + self.req.rid.encode() + b"\r\n")
        if self.chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        if not self.keep_alive:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        self.headers_sent = True
        assert self.up is not None
        self.up.out.append(b"".join(out))

    def response_body(self, data: bytes) -> None:
        self.last_data = time.perf_counter()
        BYTES_OUT.inc(len(data))
        assert self.up is not None
        if self.chunked:
            self.up.out.append(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.up.out.append(data)

    def response_done(self, upstream_keep_alive: bool) -> None:
        up, self.up = self.up, None
        if up is None:
            return
        if self.chunked:
            up.out.append(b"0\r\n\r\n")
        self.flush(up.out)
        up.exchange = None
        if upstream_keep_alive:
            self.client.pool.release(up)
        else:
            up.transport.close()
        self._finish()

    def flush(self, out: list[bytes]) -> None:
        """One write per upstream read: head, body and end of a small answer in one syscall."""
        if out:
            if not self.client.closed:
                self.client.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def upstream_failed(self, timeout: bool = False) -> None:
        """The gateway broke off (or went silent): an error if nothing was sent yet, else cut."""
        if self.done:
            return
        up, self.up = self.up, None
        if up is not None:
            self.flush(up.out)
            up.exchange = None
            up.transport.close()
            if up.reused and not up.got_bytes and not timeout and not self.retried and not self.client.closed:
                # A pooled connection the gateway closed as we wrote (its keep-alive ran out):
                # the request was not read; send it once more on a fresh connection.
                self.retried = True
                asyncio.get_running_loop().create_task(self._forward(self.route))
                return
        if not self.headers_sent:
            if timeout:
                self._answer_error(504, "gateway_timeout", "your gateway did not answer in time")
            else:
                self._answer_error(502, "gateway_unreachable", "your gateway did not answer")
            return
        log.warning("upstream broke mid-response", extra={"request_id": self.req.rid})
        self.keep_alive = False
        if not self.client.closed:
            self.client.transport.close()
        self._finish()

    def client_gone(self) -> None:
        if self.done:
            return
        up, self.up = self.up, None
        if up is not None:
            up.exchange = None
            up.transport.close()
        self._finish()

    def pause_upstream(self) -> None:
        if self.up is not None:
            self.up.transport.pause_reading()

    def resume_upstream(self) -> None:
        if self.up is not None:
            self.up.transport.resume_reading()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        req = self.req
        elapsed = time.perf_counter() - req.t0
        status = self.status or 499
        child(REQUESTS, req.route, f"{status // 100}xx").inc()
        child(LATENCY, req.route).observe(elapsed)
        tenant = self.tenant
        if self.route is not None and tenant is not None:
            ACTIVITY.closed(tenant.user_id)
        if self.route is not None and tenant is not None:
            # The fleet gate's 5xx rate: answers for a routed gateway only (the proxy's own 503
            # for a stopped agent says nothing of its image).
            ACTIVITY.answered(tenant.user_id, status)
        self.client.state.access.write(
            request_id=req.rid,
            tenant=tenant.user_id if tenant else None,
            credential=tenant.credential_id if tenant else None,
            method=req.method,
            route=req.route,
            status=status,
            ms=round(elapsed * 1000, 2),
        )
        self.client.finished(self.keep_alive)
