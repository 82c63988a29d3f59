"""python -m services.provisioner"""

from __future__ import annotations

import asyncio

from services.provisioner.app import build_app
from shared.runner import run_service
from shared.settings import ZakiSettings


async def main(settings: ZakiSettings, stop: asyncio.Event) -> None:
    pa = build_app(settings)
    await pa.app.start()
    try:
        await stop.wait()
    finally:
        await pa.app.stop()


if __name__ == "__main__":
    run_service("provisioner", main)
