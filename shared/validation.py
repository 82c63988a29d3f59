"""Input rules applied before anything touches disk or Docker."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

# Letters, digits, '-' and '_': safe as a path segment, a container and network name
# and a NATS subject token; no '.', '/', '..', whitespace or control characters.
USER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
# Telegram bot tokens: "<bot id>:<35-ish url-safe chars>".
BOT_TOKEN_RE = re.compile(r"[0-9]{5,16}:[A-Za-z0-9_-]{30,64}")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
MODEL_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,127}")
NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # a Swarm node's id or hostname


class InvalidInput(ValueError):
    """A value that the platform refuses, with a machine-readable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_user_id(value: str) -> str:
    if not isinstance(value, str) or not USER_ID_RE.fullmatch(value):
        raise InvalidInput("invalid_user_id", "user id must be 1-63 of [A-Za-z0-9_-], starting alphanumeric")
    return value


def check_bot_token(value: str) -> str:
    if not isinstance(value, str) or not BOT_TOKEN_RE.fullmatch(value):
        raise InvalidInput(
            "invalid_bot_token", "bot token is not of the form <digits>:<30-64 url-safe chars>"
        )
    return value


def _pattern(regex: re.Pattern[str], what: str):
    def check(value: str) -> str:
        if not regex.fullmatch(value):
            raise ValueError(f"{what} does not match {regex.pattern}")
        return value

    return check


UserId = Annotated[str, AfterValidator(check_user_id)]
RequestId = Annotated[str, AfterValidator(_pattern(REQUEST_ID_RE, "request id"))]
ModelRef = Annotated[str, AfterValidator(_pattern(MODEL_REF_RE, "model"))]
NodeRef = Annotated[str, AfterValidator(_pattern(NODE_RE, "node"))]
