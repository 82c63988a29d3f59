"""The proxy's own answers: one JSON error shape for every plane."""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

from aiohttp import web

from services.gateway_proxy.observe import REJECTED

REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def error_body(path: str, code: str, message: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON of an error answer: the OpenAI error shape on /v1/*."""
    if path.startswith("/v1/"):
        body: dict[str, Any] = {"error": {"message": message, "type": code, "code": code, "param": None}}
    else:
        body = {"ok": False, "error": {"type": code, "message": message}}
    return {**body, **(extra or {})}


def error_bytes(
    status: int,
    path: str,
    code: str,
    message: str,
    request_id: str,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    close: bool = False,
) -> bytes:
    """A whole HTTP/1.1 error answer, for the raw planes."""
    body = json.dumps(error_body(path, code, message, extra)).encode()
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"")),
        b"Content-Type: application/json; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"X-Request-Id: " + request_id.encode() + b"\r\n",
    ]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}\r\n".encode("latin-1"))
    if close:
        lines.append(b"Connection: close\r\n")
    return b"".join(lines) + b"\r\n" + body


def not_running(state: str | None) -> tuple[str, dict[str, Any], dict[str, str]]:
    """The 503 for an instance that is not running: message, body fields, headers
    (``Retry-After`` while it is on its way up)."""
    on_the_way = ("requested", "provisioning", "starting", "suspended", "restarting")  # not a user's stop
    headers = {"Retry-After": "5"} if state in on_the_way else {}
    return f"your gateway is {state or 'not provisioned'}", {"state": state or "absent"}, headers


def error_response(
    request: web.Request,
    status: int,
    code: str,
    message: str,
    extra: dict[str, Any] | None = None,
    **extra_headers: str,
) -> web.Response:
    """The same answer on the aiohttp plane. *extra* adds top-level fields."""
    return web.json_response(
        error_body(request.path, code, message, extra), status=status, headers=extra_headers
    )


def not_running_response(request: web.Request, state: str | None) -> web.Response:
    REJECTED.labels("instance_not_running").inc()
    message, extra, headers = not_running(state)
    return error_response(request, 503, "instance_not_running", message, extra, **headers)


# Lingering close after an error answer (nginx's lingering_close): the client's further bytes are
# read and dropped, this long and this much at most. Closing with its bytes unread would send a
# reset, which can destroy the answer in the client's receive buffer before it reads it.
LINGER_S, LINGER_MAX_BYTES = 2.0, 1 << 20


def linger(transport: Any) -> int:
    """After the answer is written: FIN, then close within LINGER_S. Returns the bytes dropped
    so far (0), or -1 when the transport cannot half-close (closed at once)."""
    if not transport.can_write_eof():
        transport.close()
        return -1
    transport.write_eof()
    asyncio.get_running_loop().call_later(LINGER_S, transport.close)
    return 0


def linger_more(transport: Any, dropped: int, n: int) -> int:
    """*n* more bytes dropped while lingering; closes past LINGER_MAX_BYTES."""
    if dropped + n > LINGER_MAX_BYTES:
        transport.close()
    return dropped + n
