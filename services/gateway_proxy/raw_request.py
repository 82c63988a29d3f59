"""One request as the raw data plane parsed it (llhttp callbacks fill it in)."""

from __future__ import annotations

from services.gateway_proxy.auth import SESSION_COOKIE, credential_from
from services.gateway_proxy.decision import Decision


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v or None
    return None


class RawRequest:
    __slots__ = (
        "body",
        "decision",
        "headers",
        "keep_alive",
        "lower",
        "method",
        "path",
        "rid",
        "route",
        "scope",
        "size",
        "t0",
        "url",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes, bytes]] = []  # (name, lower-case name, value)
        self.lower: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.path = "/"
        self.decision: Decision | None = None

    def header(self, name: bytes) -> str | None:
        v = self.lower.get(name)
        return None if v is None else v.decode("latin-1")

    def credential(self, protocols: list[str] | None = None) -> tuple[str | None, str]:
        """The caller's credential and where it came from, by the aiohttp side's rules."""
        cookie = self.header(b"cookie")
        session = _cookie(cookie, SESSION_COOKIE) if cookie else None
        return credential_from(
            {"Authorization": self.header(b"authorization") or ""},
            {SESSION_COOKIE: session} if session else {},
            protocols,
        )
