"""Where the broker's own requests may go: each provider call's host is resolved here, every
address is checked (shared/provider_url.py), and aiohttp connects only to the addresses this
resolver returned. Check and connect use the same answer, so a name that re-binds between
the two (DNS rebinding) cannot lead the broker to a refused address. Address literals never
reach a resolver in aiohttp: URLPolicy.check_url refuses those before the request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from shared.provider_url import URLPolicy, URLRefusal

# Request headers a provider may see from a gateway; the broker sets the key itself.
# Never forwarded: x-forwarded-*, x-real-ip, forwarded, metadata-flavor, x-openclaw-*, cookie...
FORWARDED_REQUEST_HEADERS = frozenset(
    {
        "content-type",
        "accept",
        "user-agent",
        "anthropic-version",
        "anthropic-beta",
        "openai-beta",
    }
)
FORWARDED_REQUEST_PREFIXES = ("x-stainless-",)  # the OpenAI/Anthropic SDKs' client metadata


def forwarded_headers(headers: Any) -> dict[str, str]:
    """The request headers that go on to the provider (an allowlist)."""
    out = {
        k: v
        for k, v in headers.items()
        if (lk := k.lower()) in FORWARDED_REQUEST_HEADERS or lk.startswith(FORWARDED_REQUEST_PREFIXES)
    }
    # The answer is counted as it passes: it must not come compressed.
    out["Accept-Encoding"] = "identity"
    return out


class EgressRefused(OSError):
    """No address of the host may be called. An OSError, so aiohttp reports it as a
    connection error that carries this exception (``ClientConnectorError.os_error``)."""

    def __init__(self, host: str, reason: URLRefusal) -> None:
        super().__init__(f"{host} resolves only to refused addresses ({reason.value})")
        self.host = host
        self.reason = reason


class GuardedResolver(AbstractResolver):
    def __init__(self, policy: URLPolicy) -> None:
        self.policy = policy

    async def _getaddrinfo(self, host: str, port: int, family: int) -> list[Any]:
        loop = asyncio.get_running_loop()
        return await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            infos = await self._getaddrinfo(host, port, family)
        except socket.gaierror as e:
            raise OSError(e.errno, f"cannot resolve {host}: {e.strerror}") from None
        results: list[ResolveResult] = []
        refusal: URLRefusal | None = None
        for fam, _, proto, _, sockaddr in infos:
            try:
                ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            except ValueError:
                continue
            reason = self.policy.address_refusal(host, port, ip)
            if reason is not None:
                refusal = refusal or reason
                continue
            results.append(
                {
                    "hostname": host,  # TLS SNI and the certificate check use the name
                    "host": str(ip),
                    "port": port,
                    "family": fam,
                    "proto": proto,
                    "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                }
            )
        if not results:
            raise EgressRefused(host, refusal or URLRefusal.HOST)
        return results

    async def close(self) -> None:
        return None


def connector(policy: URLPolicy) -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(
        limit=0, keepalive_timeout=60, ttl_dns_cache=300, resolver=GuardedResolver(policy)
    )


def refusal_of(error: BaseException) -> EgressRefused | None:
    """The egress refusal behind an aiohttp connection error, if that is what it was."""
    cause = getattr(error, "os_error", None)
    return cause if isinstance(cause, EgressRefused) else None
