"""One export at a time per user: each export runs a reader over the whole folder and streams it;
without a limit one account could start dozens at once and take the host's CPU and disk I/O.
The size is bounded by the reader (files past the tenant's disk limit are left out, listed as
``over_limit``), like a backup's."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from services.backup.errors import BackupError


class ExportBusy(BackupError):
    code = "export_in_progress"


_busy: set[str] = set()
_lock = threading.Lock()


@contextlib.contextmanager
def export_slot(user_id: str) -> Iterator[None]:
    """Held for the whole export; a second one of the same user meanwhile raises ExportBusy."""
    with _lock:
        if user_id in _busy:
            raise ExportBusy("an export of your agent's data is already running; retry when it is done")
        _busy.add(user_id)
    try:
        yield
    finally:
        with _lock:
            _busy.discard(user_id)
