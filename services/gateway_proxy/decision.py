"""What the proxy does with a request, decided in one place for both planes.

The raw data plane (``http_plane``) and the aiohttp plane (``aiohttp_app``) both call
``decide`` with the request target exactly as the client sent it: a routing or scope rule
cannot be fixed in one plane and missed in the other. The path is normalised before it is
routed, and the normalised path is what the gateway receives: the proxy and the gateway
always look at the same path (a ``/v1/models/../../ui/`` reaching the Control UI with a
chat key is how they used to disagree).
"""

from __future__ import annotations

import enum
import functools
import string
from dataclasses import dataclass, replace

from shared.gateway import CONTROL_UI_BASE_PATH, identity_headers
from shared.http import HOP_BY_HOP

# The operator scopes a route needs on the gateway, sent as x-openclaw-scopes on every
# forwarded request: in trusted-proxy mode a request without that header runs with all of
# OpenClaw's default operator scopes, operator.admin included (dist/http-auth-utils,
# resolveTrustedHttpOperatorScopes). chat.send and agent (tools/invoke) need write,
# models.list and the Control UI's reads need read; nothing here needs admin.
READ = "operator.read"
WRITE = "operator.read,operator.write"

# (method, path) -> (route label, scope, gateway scopes). Anything else is a 404: the
# proxy is an allowlist.
ROUTES: dict[tuple[str, str], tuple[str, str, str]] = {
    ("POST", "/v1/chat/completions"): ("chat_completions", "chat", WRITE),
    ("GET", "/v1/models"): ("models", "chat", READ),
    ("POST", "/v1/responses"): ("responses", "chat", WRITE),
    ("POST", "/v1/embeddings"): ("embeddings", "chat", WRITE),
    ("POST", "/tools/invoke"): ("tools_invoke", "tools", WRITE),
}
MODEL_PREFIX = "/v1/models/"  # GET /v1/models/{id}
WS_PATHS = ("/ws", "/v1/ws")
UI_PREFIX = CONTROL_UI_BASE_PATH  # the Control UI, for browsers with a session cookie
MAX_TARGET = 8 * 1024  # longer request targets are answered 414

# Client headers the proxy owns: credentials and anything that claims an identity or origin.
STRIPPED_REQUEST = HOP_BY_HOP | {
    "authorization",
    "cookie",
    "host",
    "content-length",
    "forwarded",
    "x-real-ip",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-user",
    "x-request-id",
    "origin",
    "x-openclaw-scopes",
}
STRIPPED_RESPONSE = HOP_BY_HOP | {"content-length", "set-cookie", "server"}


class Kind(enum.Enum):
    API = "api"  # an API route: checked, then forwarded
    WEBSOCKET = "websocket"  # /ws or the Control UI's WebSocket
    UI = "ui"  # the Control UI's pages and assets
    HEALTH = "health"  # the proxy's own /healthz
    NOT_FOUND = "not_found"
    BAD_PATH = "bad_path"  # refused before routing (400)


@dataclass(frozen=True, slots=True)
class Decision:
    kind: Kind
    route: str  # the route's label (metrics, access log)
    scope: str  # the credential scope it needs ("" for none)
    path: str  # the normalised path, routed on and forwarded
    target: str  # what the gateway is sent: the normalised path and the client's query
    gateway_scopes: str = ""  # x-openclaw-scopes: the least the route needs, never admin
    error: str = ""  # why a BAD_PATH was refused


class PathError(ValueError):
    pass


_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)


def normalise_path(raw: str) -> str:
    """The path a gateway resolves *raw* to, or PathError when it is ambiguous.

    Percent-escapes of unreserved characters are decoded (so ``%2e%2e`` is ``..``), other
    escapes are kept (upper-cased), dot segments are resolved (never above the root), empty
    segments collapse. An encoded ``/`` or ``\\``, a raw ``\\``, a fragment, a malformed
    escape or a byte outside printable ASCII is refused: servers disagree on those.
    """
    if not raw.startswith("/"):
        raise PathError("the request target must be a path")
    if "\\" in raw or "#" in raw or not raw.isascii() or not raw.isprintable() or " " in raw:
        raise PathError("the path holds a character that is not allowed")
    if "%" in raw:
        parts = raw.split("%")
        out = [parts[0]]
        for part in parts[1:]:
            code = part[:2]
            if len(code) < 2 or not _HEX.issuperset(code):
                raise PathError("malformed percent-escape in the path")
            ch = chr(int(code, 16))
            if ch in "/\\":
                raise PathError("an encoded '/' or '\\' in the path is not allowed")
            out.append((ch if ch in _UNRESERVED else "%" + code.upper()) + part[2:])
        raw = "".join(out)
    segments = raw[1:].split("/")
    resolved: list[str] = []
    for seg in segments:  # RFC 3986 5.2.4, as a gateway's URL parser does it
        if seg == "..":
            if resolved:
                resolved.pop()
        elif seg != ".":
            resolved.append(seg)
    if segments[-1] in (".", ".."):
        resolved.append("")  # "/a/b/.." is "/a/": the trailing slash stays
    # Then "//" collapses; a trailing "/" stays.
    kept = [seg for seg in resolved[:-1] if seg] + resolved[-1:]
    return "/" + "/".join(kept)


def _origin_form(target: str) -> str:
    """``http://host/path`` (absolute-form) is routed and forwarded as ``/path``."""
    lower = target[:8].lower()
    if lower.startswith(("http://", "https://")):
        rest = target[target.index("//") + 2 :]
        slash = rest.find("/")
        return rest[slash:] if slash >= 0 else "/"
    return target


def decide(method: str, target: str, upgrade: bool) -> Decision:
    """The route, the scope a credential needs for it and the target to forward, for a
    request as sent (*target* is the raw request target: path and query)."""
    path, sep, query = target.partition("?")
    d = _decide(method, path, upgrade)
    if sep and d.kind is not Kind.BAD_PATH:
        d = replace(d, target=f"{d.path}?{query}")
    return d


@functools.lru_cache(maxsize=4096)
def _decide(method: str, raw_path: str, upgrade: bool) -> Decision:
    try:
        path = normalise_path(_origin_form(raw_path))
    except PathError as e:
        return Decision(Kind.BAD_PATH, "other", "", "/", "/", error=str(e))
    ui = path == UI_PREFIX or path.startswith(UI_PREFIX + "/")
    if path in WS_PATHS or (ui and upgrade):
        # On a WebSocket the header caps what the gateway's identityScopes grant.
        route, scope = ("control_ui_ws", "ui") if ui else ("websocket", "ws")
        return Decision(Kind.WEBSOCKET, route, scope, path, path, WRITE)
    known = ROUTES.get((method, path))
    if known is None and method == "GET" and path.startswith(MODEL_PREFIX):
        known = ("models", "chat", READ)
    if known is not None:
        return Decision(Kind.API, *known[:2], path, path, known[2])
    if ui and method in ("GET", "HEAD"):
        # The gateway's Control UI (served under gateway.controlUi.basePath = UI_PREFIX).
        return Decision(Kind.UI, "control_ui", "ui", path, path, READ)
    if path == "/healthz" and method in ("GET", "HEAD"):
        return Decision(Kind.HEALTH, "other", "", path, path)
    return Decision(Kind.NOT_FOUND, "other", "", path, path)


def gateway_headers(
    d: Decision, user_id: str, client_ip: str | None, proto: str, host: str, request_id: str
) -> dict[str, str]:
    """The headers the proxy sets on what it forwards (the client's copies are stripped):
    the trusted-proxy identity, where the request came from, and the route's scopes."""
    headers = identity_headers(user_id, client_ip, proto=proto)
    headers["x-forwarded-host"] = host
    headers["x-request-id"] = request_id
    headers["x-openclaw-scopes"] = d.gateway_scopes
    return headers


def gateway_ws_headers(
    d: Decision, user_id: str, client_ip: str | None, proto: str, origin: str | None
) -> dict[str, str]:
    """The same for a WebSocket handshake: identity, the proxy's own Origin, the scope cap."""
    headers = identity_headers(user_id, client_ip, proto=proto)
    if origin:
        headers["Origin"] = origin
    headers["x-openclaw-scopes"] = d.gateway_scopes
    return headers
