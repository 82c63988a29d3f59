"""Structured JSON logs that never carry a secret.

Every record passes a :class:`Redactor`: known secret shapes (Telegram bot tokens,
bearer credentials, Zaki API keys, provider keys, JSON/kv fields named like secrets)
and every literal secret registered at run time are replaced by ``[REDACTED]``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any

REDACTED = "[REDACTED]"

_PATTERNS = [
    re.compile(r"\b[0-9]{5,16}:[A-Za-z0-9_-]{30,64}\b"),  # Telegram bot token
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"),
    re.compile(r"\bzk_[A-Za-z0-9_-]{16,}"),  # Zaki API keys
    re.compile(r"\bzk1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{16,}"),  # sealed values
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),  # provider keys
    re.compile(
        r"""(?ix)(["']?(?:[a-z_]*token|password|api_?key|apikey|secret|authorization)["']?\s*[:=]\s*)"""
        r"""("[^"]*"|'[^']*'|[^\s,}&]+)"""
    ),
]


class Redactor:
    def __init__(self) -> None:
        self._literals: set[str] = set()
        self._lock = threading.Lock()

    def register(self, secret: str | None) -> None:
        """Adds a literal secret (a decrypted gateway password, say) to redact everywhere."""
        if secret and len(secret) >= 8:
            with self._lock:
                self._literals.add(secret)

    def __call__(self, text: str) -> str:
        for literal in tuple(self._literals):
            if literal in text:
                text = text.replace(literal, REDACTED)
        for i, pattern in enumerate(_PATTERNS):
            if i == len(_PATTERNS) - 1:
                text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
            else:
                text = pattern.sub(REDACTED, text)
        return text


redact = Redactor()

_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        line = json.dumps(out, default=str)
        # Hot-path records (the proxy's access log) are built only from fields that cannot
        # hold a secret, and mark themselves so; everything else is redacted.
        return line if record.__dict__.get("_safe") is True else redact(line)


def configure_logging(service: str, level: str = "INFO", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library loggers that echo request lines or URLs stay at WARNING.
    for noisy in ("httpx", "httpcore", "docker", "urllib3", "aiohttp.access", "pymongo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
