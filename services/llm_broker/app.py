"""The LLM broker: every model call of every gateway, with the provider key attached here.

A gateway's ``openclaw.json`` names the broker as its provider's ``baseUrl``
(``<broker>/p/<provider>``) and holds a per-instance broker credential as ``apiKey``.
The broker checks that credential (and that it comes from that instance's own network),
enforces the user's budget, swaps in the real key (the platform's, or the user's own) and
streams the provider's answer back unchanged while counting its tokens.

The provider URL is checked on every call (shared/provider_url.py: a user's own URL is
hostile), its host's addresses when it connects (egress.py), only an allowlist of request
headers goes on, and a redirect is passed back to the caller, never followed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import Counter, Histogram
from pymongo.errors import PyMongoError

from services.llm_broker import egress, model_path
from services.llm_broker.budget import BudgetPolicy, UsageLedger, Verdict
from services.llm_broker.directory import LIVE_STATES, BrokerClient, Directory, ProviderUnavailable, Upstream
from services.llm_broker.requests import prepare
from services.llm_broker.reservations import Reservation
from services.llm_broker.usage import CHARS_PER_TOKEN, UsageMeter
from shared.activity import ActivityRecorder
from shared.crypto import BROKER_CREDENTIAL_PREFIX
from shared.http import HOP_BY_HOP
from shared.provider_url import ProviderURL, ProviderURLError, URLPolicy
from shared.settings import ZakiSettings

ACTIVITY = ActivityRecorder("broker")  # last model call per user, flushed every ZAKI_ACTIVITY_FLUSH_S
log = logging.getLogger("zaki.broker")

REQUESTS = Counter(
    "zaki_broker_requests_total", "Model calls through the broker", ["provider", "status_class"]
)
TOKENS = Counter("zaki_broker_tokens_total", "Tokens counted by the broker", ["provider", "kind"])
REFUSED = Counter("zaki_broker_refused_total", "Calls the broker refused", ["reason"])
UPSTREAM_SECONDS = Histogram(
    "zaki_broker_upstream_seconds",
    "Provider time to response headers",
    ["provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
OVERHEAD_SECONDS = Histogram(
    "zaki_broker_overhead_seconds",
    "Time the broker spends before calling the provider (auth, budget, key)",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)

# Paths a provider API may be called on, relative to its base URL. Anything else is a 404.
_MODEL = r"models(/(?!\.\.?$)[\w.:@-]+)?"  # a model id, never a dot segment
ALLOWED_PATHS: dict[str, re.Pattern[str]] = {
    "openai-completions": re.compile(rf"^(chat/completions|completions|embeddings|{_MODEL})$"),
    "openai-responses": re.compile(rf"^(responses|chat/completions|embeddings|{_MODEL})$"),
    "anthropic-messages": re.compile(rf"^v1/(messages|messages/count_tokens|{_MODEL})$"),
}
SMALL_BODY = 256 * 1024
_PATH = re.compile(r"^/p/([a-z][a-z0-9-]{0,31})/(.*)$")

STRIPPED_RESPONSE = HOP_BY_HOP | {
    "content-length",
    "set-cookie",
    "server",
    "openai-organization",
    "openai-project",
    "anthropic-organization-id",
}

_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


def provider_error(api: str, status: int, code: str, message: str, **headers: str) -> web.Response:
    """An error in the shape the calling SDK expects, so the agent can tell the user what happened."""
    if api.startswith("anthropic"):
        body: dict[str, Any] = {
            "type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message},
        }
    else:
        kind = {401: "invalid_request_error", 429: "requests"}.get(status, "invalid_request_error")
        if status >= 500:
            kind = "server_error"
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _credential(headers: Any) -> str | None:
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("x-api-key") or headers.get("api-key") or None


def _guess_api(request: web.Request) -> str:
    h = request.headers
    return "anthropic-messages" if ("x-api-key" in h or "anthropic-version" in h) else "openai-completions"


class LLMBroker:
    def __init__(
        self,
        settings: ZakiSettings,
        directory: Directory,
        ledger: UsageLedger,
        publish: Callable[[str, Verdict, BrokerClient, bool], Awaitable[None]],
    ) -> None:
        self.s = settings
        self.directory = directory
        self.ledger = ledger
        self.publish = publish
        self.session: aiohttp.ClientSession | None = None
        self.policy = URLPolicy.from_settings(settings)
        self._targets: dict[str, ProviderURL] = {}  # base URLs that passed the check

    def build(self) -> web.Application:
        app = web.Application(client_max_size=self.s.max_body_bytes)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _start(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(
            connector=egress.connector(self.policy),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=self.s.broker_timeout_s, connect=10, sock_read=300),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        self.ledger.start()
        self._activity = asyncio.create_task(ACTIVITY.run(self.directory.store.db, self.s.activity_flush_s))

    async def _cleanup(self, app: web.Application) -> None:
        if getattr(self, "_activity", None) is not None:
            self._activity.cancel()
        if self.session is not None:
            await self.session.close()
        await self.ledger.stop()

    async def healthz(self, request: web.Request) -> web.Response:
        # "source": the caller's address as the broker sees it (what the network check compares).
        return web.json_response({"ok": True, "source": request.remote})

    def _refuse(self, api: str, status: int, reason: str, message: str, **headers: str) -> web.Response:
        REFUSED.labels(reason).inc()
        return provider_error(api, status, reason, message, **headers)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        api = _guess_api(request)
        credential = _credential(request.headers)
        if not credential or not credential.startswith(BROKER_CREDENTIAL_PREFIX) or len(credential) > 200:
            return self._refuse(api, 401, "invalid_api_key", "missing or malformed broker credential")
        client = await self.directory.client(credential)
        if client is None:
            return self._refuse(api, 401, "invalid_api_key", "unknown broker credential")
        if self.s.broker_check_source and not client.allows_source(request.remote):
            # A credential copied out of one tenant's container is useless anywhere else.
            log.warning(
                "broker credential used from outside its network",
                extra={"user_id": client.user_id, "source": request.remote},
            )
            model_path.note(client, request.remote, refused=True)  # the monitor hears of it
            return self._refuse(api, 403, "wrong_network", "this credential is not valid from this address")
        model_path.note(client, request.remote, refused=False)
        if client.state not in LIVE_STATES:
            return self._refuse(api, 403, "instance_not_running", f"the instance is {client.state}")
        ACTIVITY.touch(client.user_id)  # a model call keeps its gateway awake (idle suspend)
        m = _PATH.match(request.path)
        if m is None:
            return self._refuse(api, 404, "not_found", "no such route; use /p/<provider>/...")
        name, rest = m.groups()
        try:
            upstream = await self.directory.upstream(client, name)
        except ProviderUnavailable:
            return self._refuse(api, 404, "unknown_provider", f"no active provider named {name!r}")
        api = upstream.api
        allowed = ALLOWED_PATHS.get(api)
        if allowed is None or not allowed.match(rest) or request.method not in ("GET", "POST"):
            return self._refuse(api, 404, "not_found", f"{request.method} {rest} is not a model call")
        try:
            target = self._target(upstream.base_url)
        except ProviderURLError as e:
            log.warning("provider URL refused", extra={"user_id": client.user_id, "reason": e.reason.value})
            return self._refuse(api, 403, "provider_url_refused", str(e))
        policy = BudgetPolicy.effective(client.budget, self.s)
        try:
            verdict = await self.ledger.check(client.user_id, policy)
        except PyMongoError:
            return self._budget_unavailable(api, client)
        if verdict is not None:
            return await self._over_budget(api, verdict, client, True)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(api, 413, "request_too_large", f"body over {self.s.max_body_bytes} bytes")
        limited = request.method == "POST" and bool(policy.tokens_per_day or policy.tokens_per_month)
        ask_usage = self.s.broker_request_stream_usage and api.startswith("openai") and b'"stream"' in body
        reservation: Reservation | None = None
        if limited or ask_usage:
            prepared = prepare(api, rest, body, self.s.broker_reserve_tokens, ask_usage)
            body = prepared.body
            if limited:
                try:
                    held = await self.ledger.reserve(client.user_id, policy, prepared.reserve)
                except (PyMongoError, RuntimeError):
                    return self._budget_unavailable(api, client)
                if isinstance(held, Verdict):
                    return await self._over_budget(api, held, client, False)
                reservation = held
        OVERHEAD_SECONDS.observe(time.perf_counter() - t0)
        try:
            resp = await self._forward(request, client, upstream, target, rest, body, reservation)
            ACTIVITY.answered(client.user_id, resp.status)  # the fleet gate's broker error rate
            return resp
        finally:
            if reservation is not None and not reservation.done:
                await self.ledger.release(reservation)  # refused, failed or broken before counting

    def _budget_unavailable(self, api: str, client: BrokerClient) -> web.Response:
        # A hard limit cannot be checked without the store: refuse, briefly.
        log.warning("budget store unavailable", extra={"user_id": client.user_id})
        return self._refuse(
            api, 503, "budget_unavailable", "the budget cannot be checked right now", **{"Retry-After": "2"}
        )

    async def _over_budget(
        self, api: str, verdict: Verdict, client: BrokerClient, used_up: bool
    ) -> web.Response:
        """A provider-style 429. *used_up*: the usage itself reached the limit (one event is
        published); otherwise the calls in flight hold the rest of it for now."""
        REFUSED.labels(verdict.limit.value if used_up else "tokens_in_flight").inc()
        if used_up:
            await self.publish("exceeded", verdict, client, True)
            why = f"{verdict.used} were used in {verdict.period}"
        else:
            why = f"{verdict.used} are used or held by calls in flight in {verdict.period}"
        return provider_error(
            api,
            429,
            "rate_limit_exceeded",
            f"budget exceeded: {verdict.limit.value} is {verdict.allowed} and {why}; "
            f"calls resume in {verdict.retry_after_s} s",
            **{"Retry-After": str(verdict.retry_after_s)},
        )

    def _target(self, base_url: str) -> ProviderURL:
        """The checked provider URL (cached: operators' providers are called all the time)."""
        target = self._targets.get(base_url)
        if target is None:
            target = self.policy.check_url(base_url)
            if len(self._targets) > 10_000:
                self._targets.clear()
            self._targets[base_url] = target
        return target

    def _upstream_request(
        self, request: web.Request, up: Upstream, target: ProviderURL, rest: str
    ) -> tuple[str, dict[str, str]]:
        headers = egress.forwarded_headers(request.headers)
        if up.key:
            if up.api.startswith("anthropic"):
                headers["x-api-key"] = up.key
            else:
                headers["Authorization"] = f"Bearer {up.key}"
        query = request.rel_url.raw_query_string
        return f"{target.url}/{rest}{'?' + query if query else ''}", headers

    async def _forward(
        self,
        request: web.Request,
        client: BrokerClient,
        up: Upstream,
        target: ProviderURL,
        rest: str,
        body: bytes,
        reservation: Reservation | None,
    ) -> web.StreamResponse:
        assert self.session is not None
        label = "byok" if up.version == 0 else up.name
        t0 = time.perf_counter()
        for attempt in (1, 2):
            url, headers = self._upstream_request(request, up, target, rest)
            try:
                upstream = await self.session.request(
                    request.method, url, headers=headers, data=body, allow_redirects=False
                )
            except (aiohttp.ClientError, TimeoutError) as e:
                refused = egress.refusal_of(e)
                if refused is not None:
                    log.warning(
                        "provider address refused",
                        extra={"user_id": client.user_id, "reason": refused.reason.value},
                    )
                    return self._refuse(
                        up.api,
                        403,
                        "provider_address_refused",
                        f"provider URL refused ({refused.reason.value}): {target.host} resolves only to "
                        "addresses the broker may not call; an operator may allow it in "
                        "ZAKI_BROKER_PRIVATE_HOSTS",
                    )
                REQUESTS.labels(label, "5xx").inc()
                log.warning("provider unreachable", extra={"provider": up.name, "error": type(e).__name__})
                return provider_error(
                    up.api, 502, "provider_unreachable", "the model provider did not answer"
                )
            if upstream.status == 401 and attempt == 1 and up.version:
                # The key may have been rotated a moment ago: re-read it once and retry.
                self.directory.forget_provider(up.name)
                try:
                    fresh = await self.directory.upstream(client, up.name)
                except ProviderUnavailable:
                    fresh = up
                if fresh.version != up.version:
                    upstream.release()
                    up = fresh
                    try:
                        target = self._target(up.base_url)
                    except ProviderURLError as e:
                        return self._refuse(up.api, 403, "provider_url_refused", str(e))
                    continue
            break
        UPSTREAM_SECONDS.labels(label).observe(time.perf_counter() - t0)
        REQUESTS.labels(label, f"{upstream.status // 100}xx").inc()
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in STRIPPED_RESPONSE}
        streaming = "text/event-stream" in upstream.headers.get("Content-Type", "")
        meter = UsageMeter(streaming)
        length = upstream.headers.get("Content-Length")
        if not streaming and length is not None and int(length) <= SMALL_BODY:
            # A JSON answer of known size: one read, one write.
            try:
                data = await upstream.read()
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
                return provider_error(up.api, 502, "provider_unreachable", "the model provider broke off")
            finally:
                upstream.release()
            meter.feed(data)
            if upstream.status < 400:
                await self._count(client, label, meter, body, reservation)
            return web.Response(status=upstream.status, body=data, headers=headers)
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        counted = False
        try:
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)  # forwarded first, counted after
                meter.feed(chunk)
            upstream.release()
            counted = True
            if upstream.status < 400:
                await self._count(client, label, meter, body, reservation)  # in the database before the end
            await resp.write_eof()
        except (
            aiohttp.ClientPayloadError,
            aiohttp.ClientConnectionError,
            TimeoutError,
            ConnectionResetError,
        ):
            log.warning("stream broke off", extra={"provider": up.name, "user_id": client.user_id})
        finally:
            upstream.release()
            if not counted and upstream.status < 400:
                await self._count(client, label, meter, body, reservation)  # streamed before the break
        return resp

    async def _count(
        self,
        client: BrokerClient,
        label: str,
        meter: UsageMeter,
        body: bytes,
        reservation: Reservation | None,
    ) -> None:
        usage = meter.finish()
        if not usage.reported:
            usage.prompt_tokens = -(-len(body) // CHARS_PER_TOKEN)
        TOKENS.labels(label, "prompt").inc(usage.prompt_tokens)
        TOKENS.labels(label, "completion").inc(usage.completion_tokens)
        await self.ledger.record_durably(
            client.user_id, usage.prompt_tokens, usage.completion_tokens, reservation=reservation
        )
        policy = BudgetPolicy.effective(client.budget, self.s)
        if policy.tokens_per_day or policy.tokens_per_month:
            asyncio.get_running_loop().create_task(self._maybe_warn(client, policy))

    async def _maybe_warn(self, client: BrokerClient, policy: BudgetPolicy) -> None:
        try:
            verdict = await self.ledger.soft_crossed(client.user_id, policy)
            if verdict is not None:
                await self.publish("warning", verdict, client, False)
        except Exception:
            log.exception("budget warning failed", extra={"user_id": client.user_id})
