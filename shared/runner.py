"""Common start-up for the services' ``python -m`` entry points."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from shared.logging import configure_logging
from shared.settings import ZakiSettings, get_settings
from shared.telemetry import serve_metrics


def run_service(name: str, main: Callable[[ZakiSettings, asyncio.Event], Awaitable[None]]) -> None:
    """Configures JSON logging and metrics, then runs *main* until SIGTERM/SIGINT sets the stop event."""
    settings = get_settings()
    configure_logging(name)
    serve_metrics(settings.metrics_port, settings.metrics_host)
    log = logging.getLogger(f"zaki.{name}")

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("starting", extra={"replica": settings.replica_id})
        await main(settings, stop)
        log.info("stopped")

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(runner())
