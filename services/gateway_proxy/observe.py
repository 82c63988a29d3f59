"""What the proxy reports: Prometheus metrics, request ids and the access log."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

access_log = logging.getLogger("zaki.proxy.access")

REQUESTS = Counter("zaki_proxy_requests_total", "Proxied requests", ["route", "status_class"])
LATENCY = Histogram(
    "zaki_proxy_request_seconds",
    "Time to response headers",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
UPSTREAM_LATENCY = Histogram(
    "zaki_proxy_upstream_seconds",
    "Upstream time to response headers",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
OPEN_WS = Gauge("zaki_proxy_open_websockets", "Open client WebSockets")
BYTES = Counter("zaki_proxy_bytes_total", "Bytes relayed", ["direction"])
REJECTED = Counter("zaki_proxy_rejected_total", "Requests refused by the proxy", ["reason"])
BYTES_IN, BYTES_OUT = BYTES.labels("in"), BYTES.labels("out")
_children: dict[tuple, Any] = {}


def child(metric, *labels: str):
    """Labelled metric children, looked up once (labels() costs a lock and a dict build)."""
    key = (id(metric), *labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


# WebSocket bytes relayed (in, out) since the last flush into zaki_proxy_bytes_total: counted
# per message in plain ints, added to the Prometheus counter every few seconds (flush_relayed).
RELAYED = [0, 0]


def flush_relayed() -> None:
    if RELAYED[0]:
        BYTES_IN.inc(RELAYED[0])
    if RELAYED[1]:
        BYTES_OUT.inc(RELAYED[1])
    RELAYED[0] = RELAYED[1] = 0


_RID_PREFIX = uuid.uuid4().hex[:6]
_rid_counter = itertools.count(1)


def next_request_id() -> str:
    """Unique per process start and cheap: a random prefix and a counter."""
    return f"{_RID_PREFIX}{next(_rid_counter):010x}"


_PLAIN = re.compile(r"[A-Za-z0-9_.:@-]*")


def _json_str(value: str | None) -> str:
    if value is None:
        return "null"
    return f'"{value}"' if _PLAIN.fullmatch(value) else json.dumps(value)


class AccessLog:
    """Access log lines (JSON, same shape as the service's other logs) written in batches:
    one write every 200 ms instead of a logging record and a syscall per request."""

    def __init__(self, stream=None, interval: float = 0.2) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.lines: list[str] = []
        self.task: asyncio.Task | None = None
        self.enabled = access_log.isEnabledFor(logging.INFO)

    def write(
        self,
        request_id: str,
        tenant: str | None,
        credential: str | None,
        method: str,
        route: str,
        status: int,
        ms: float,
    ) -> None:
        if not self.enabled:
            return
        # Formatted by hand (json.dumps per request cost a tenth of the proxy's time); only
        # the two fields that may hold arbitrary text go through the JSON encoder. Only fields
        # that cannot carry a secret: validated ids, the route's label, the status.
        self.lines.append(
            f'{{"ts": "{datetime.now(UTC).isoformat(timespec="milliseconds")}", "level": "info", '
            f'"service": "gateway_proxy", "logger": "zaki.proxy.access", "msg": "request", '
            f'"request_id": "{request_id}", "tenant": {_json_str(tenant)}, '
            f'"credential": {_json_str(credential)}, "method": "{method}", "route": "{route}", '
            f'"status": {status}, "ms": {ms}}}'
        )
        if len(self.lines) >= 1000:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            lines, self.lines = self.lines, []
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.flush()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.flush()
