"""HTTP probes of a gateway's health endpoints, as the proxy would send them."""

from __future__ import annotations

import time
from dataclasses import dataclass

from shared.gateway import identity_headers


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    status: int | None  # HTTP status, None when no answer
    latency_s: float
    error: str = ""  # "", "timeout", "refused", "http_<status>", ...


class AioProber:
    """Probes on aiohttp (several times cheaper per request than httpx, which matters to a
    monitor probing thousands of gateways), sent as the proxy would send them."""

    def __init__(self, concurrency: int) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self.session = aiohttp.ClientSession(
            # One kept-alive connection per gateway (concurrency is bounded by the caller):
            # reconnecting to every gateway on every sweep costs both sides far more CPU.
            connector=aiohttp.TCPConnector(
                limit=0, limit_per_host=2, keepalive_timeout=75, ttl_dns_cache=300
            ),
            skip_auto_headers=("User-Agent",),
        )

    async def probe(
        self, host: str, port: int, user_id: str, path: str = "/readyz", timeout: float = 2.0
    ) -> ProbeResult:
        aiohttp = self._aiohttp
        start = time.perf_counter()
        try:
            async with self.session.get(
                f"http://{host}:{port}{path}",
                headers=identity_headers(user_id),
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as r:
                await r.read()
                status = r.status
        except TimeoutError:
            return ProbeResult(False, None, time.perf_counter() - start, "timeout")
        except aiohttp.ClientConnectorError:
            return ProbeResult(False, None, time.perf_counter() - start, "refused")
        except aiohttp.ClientError as e:
            return ProbeResult(False, None, time.perf_counter() - start, type(e).__name__.lower())
        elapsed = time.perf_counter() - start
        if status == 200:
            return ProbeResult(True, 200, elapsed)
        return ProbeResult(False, status, elapsed, f"http_{status}")

    async def close(self) -> None:
        await self.session.close()
