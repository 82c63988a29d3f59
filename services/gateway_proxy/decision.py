"""What the proxy does with a request, decided in one place for both planes.

The raw data plane (``http_plane``) and the aiohttp plane (``aiohttp_app``) both call
``decide``; a routing or scope rule therefore cannot be fixed in one and missed in the other.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

from shared.gateway import CONTROL_UI_BASE_PATH
from shared.http import HOP_BY_HOP

# (method, path) -> (route label, scope). Anything else is a 404: the proxy is an allowlist.
ROUTES: dict[tuple[str, str], tuple[str, str]] = {
    ("POST", "/v1/chat/completions"): ("chat_completions", "chat"),
    ("GET", "/v1/models"): ("models", "chat"),
    ("POST", "/v1/responses"): ("responses", "chat"),
    ("POST", "/v1/embeddings"): ("embeddings", "chat"),
    ("POST", "/tools/invoke"): ("tools_invoke", "tools"),
}
MODEL_PREFIX = "/v1/models/"  # GET /v1/models/{id}
WS_PATHS = ("/ws", "/v1/ws")
UI_PREFIX = CONTROL_UI_BASE_PATH  # the Control UI, for browsers with a session cookie

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


@dataclass(frozen=True, slots=True)
class Decision:
    kind: Kind
    route: str  # the route's label (metrics, access log)
    scope: str  # the credential scope it needs ("" for none)
    path: str  # the path routed on


def is_ui(path: str) -> bool:
    return path == UI_PREFIX or path.startswith(UI_PREFIX + "/")


@functools.lru_cache(maxsize=4096)
def decide(method: str, path: str, upgrade: bool) -> Decision:
    """The route, and the scope a credential needs for it, of one request."""
    ui = is_ui(path)
    if path in WS_PATHS or (ui and upgrade):
        return Decision(Kind.WEBSOCKET, "control_ui_ws" if ui else "websocket", "ui" if ui else "ws", path)
    known = ROUTES.get((method, path))
    if known is None and method == "GET" and path.startswith(MODEL_PREFIX):
        known = ("models", "chat")
    if known is not None:
        return Decision(Kind.API, known[0], known[1], path)
    if ui and method in ("GET", "HEAD"):
        # The gateway's Control UI (served under gateway.controlUi.basePath = UI_PREFIX).
        return Decision(Kind.UI, "control_ui", "ui", path)
    if path == "/healthz" and method in ("GET", "HEAD"):
        return Decision(Kind.HEALTH, "other", "", path)
    return Decision(Kind.NOT_FOUND, "other", "", path)
