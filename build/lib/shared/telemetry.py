"""Prometheus metrics plumbing shared by the services."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server


def serve_metrics(port: int, registry: CollectorRegistry = REGISTRY) -> None:
    """Exposes /metrics on *port* (0 disables it)."""
    if port:
        start_http_server(port, addr="0.0.0.0", registry=registry)
