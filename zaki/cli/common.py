"""What every ``zaki`` command shares: where the state lives, messages, reaching the stack."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent.parent
DEFAULT_STATE = REPO / ".zaki" / "state"

T = TypeVar("T")


def say(msg: str) -> None:
    print(f"\033[1m[zaki]\033[0m {msg}", file=sys.stderr, flush=True)


def load_env(state_dir: Path) -> None:
    """Loads the ZAKI_* settings ``zaki up`` wrote, so other commands reach the same stack."""
    env_file = state_dir / "env.json"
    if env_file.exists():
        for k, v in json.loads(env_file.read_text()).items():
            os.environ.setdefault(k, v)


async def with_platform(fn: Callable[[Any, Any], Awaitable[T]]) -> T:
    from shared.client import PlatformClient
    from shared.settings import ZakiSettings

    settings = ZakiSettings()
    client = await PlatformClient.connect(settings.nats_url)
    try:
        return await fn(client, settings)
    finally:
        await client.close()


async def with_store(fn: Callable[[Any, Any], Awaitable[T]]) -> T:
    from shared.settings import ZakiSettings
    from shared.store import Store

    settings = ZakiSettings()
    store = Store(settings.mongo_url, settings.mongo_db)
    try:
        return await fn(store, settings)
    finally:
        await store.close()


def print_outcome(subject: str, event: Any) -> int:
    data = json.loads(event.model_dump_json())
    print(json.dumps({"event": subject, **data}, indent=1))
    return 1 if subject.endswith(".failed") else 0


async def progress(what: str, coro: Awaitable[T]) -> T:
    """Runs *coro* while showing elapsed time on the terminal."""
    task = asyncio.ensure_future(coro)
    t0 = time.monotonic()
    while not task.done():
        if sys.stderr.isatty():
            print(f"\r{what}... {time.monotonic() - t0:4.0f} s", end="", file=sys.stderr, flush=True)
        await asyncio.wait([task], timeout=0.5)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return task.result()
