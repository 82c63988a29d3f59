"""HTTP facts the proxy and the broker share."""

from __future__ import annotations

# Connection-level headers (RFC 9110 §7.6.1): never forwarded by a proxy.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
