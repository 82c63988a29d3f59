"""What every ``zaki`` command shares: where the state lives, messages, reaching the stack."""

from __future__ import annotations

import asyncio
import contextlib
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


def write_private(path: Path, text: str, *, replace: bool = True) -> bool:
    """Writes a secret file that is owner-only from its first byte: created 0600 under a
    temporary name (O_EXCL, so never through someone's symlink) and then moved into place,
    so nobody ever sees it with a wider mode or half-written. With ``replace=False`` an
    existing file is kept (a key ring must never be overwritten) and False is returned."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # atomic create-if-absent
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
