"""Prometheus metrics plumbing shared by the services."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server


def serve_metrics(port: int, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY) -> None:
    """Exposes /metrics on *host*:*port* (0 disables it). Loopback by default: a port bound
    to all interfaces is reachable from inside every tenant container (ZAKI_METRICS_HOST)."""
    if port:
        start_http_server(port, addr=host, registry=registry)
