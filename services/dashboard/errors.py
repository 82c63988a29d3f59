"""The dashboard API's one error type: an HTTP status, a typed code and a message for people."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.extra = extra or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message, **self.extra}
        if self.field is not None:
            err["field"] = self.field
        return {"error": err}


def not_found(what: str = "not found") -> ApiError:
    return ApiError(404, "not_found", what)


def invalid(message: str, field: str | None = None, code: str = "invalid_input") -> ApiError:
    return ApiError(400, code, message, field)


NOT_AUTHENTICATED = ("not_authenticated", "log in first (no session, or it expired or was revoked)")
