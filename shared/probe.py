"""HTTP probes of a gateway's health endpoints, as the proxy would send them."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from shared.gateway import identity_headers


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    status: int | None  # HTTP status, None when no answer
    latency_s: float
    error: str = ""  # "", "timeout", "refused", "http_<status>", ...


async def probe(
    client: httpx.AsyncClient, host: str, port: int, user_id: str, path: str = "/readyz", timeout: float = 2.0
) -> ProbeResult:
    start = time.perf_counter()
    try:
        r = await client.get(
            f"http://{host}:{port}{path}", headers=identity_headers(user_id), timeout=timeout
        )
    except httpx.TimeoutException:
        return ProbeResult(False, None, time.perf_counter() - start, "timeout")
    except httpx.ConnectError:
        return ProbeResult(False, None, time.perf_counter() - start, "refused")
    except httpx.HTTPError as e:
        return ProbeResult(False, None, time.perf_counter() - start, type(e).__name__.lower())
    elapsed = time.perf_counter() - start
    if r.status_code == 200:
        return ProbeResult(True, 200, elapsed)
    return ProbeResult(False, r.status_code, elapsed, f"http_{r.status_code}")
