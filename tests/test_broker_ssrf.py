"""Issue 13, item 1: the LLM broker no longer fetches any URL a user names.

Every refused address below is refused before a connection is attempted (by the decision
function, or by the broker answering 403 without a packet to that address); the only
servers these tests connect to are their own, on loopback or on the Docker bridge.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import uuid

import aiohttp
import httpx
import pytest
from aiohttp import web

from services.llm_broker.egress import EgressRefused, GuardedResolver, forwarded_headers, refusal_of
from services.llm_broker.providers import seed_default_provider
from shared import subjects
from shared.bus import MalformedEvent, decode_event
from shared.crypto import KeyRing, provider_key_context
from shared.events import (
    FailureReason,
    InstanceCommand,
    InstanceDelete,
    InstanceRequested,
    InstanceUpdate,
    ProviderSettings,
)
from shared.provider_url import (
    HostRule,
    ProviderURLError,
    URLPolicy,
    URLRefusal,
    address_class,
)
from shared.settings import ZakiSettings
from tests.conftest import STANDIN_IMAGE, broker_url, new_user
from tests.test_broker import chat_body, fake_instance

STRICT = URLPolicy.from_settings(ZakiSettings())  # a plain platform's defaults

# --- the decision: one rule for events, operators' providers and call time -----------------------

REFUSED = [
    ("http://127.0.0.1:9100/metrics#", URLRefusal.FRAGMENT),  # the attack of the issue
    ("https://api.example.com/v1#", URLRefusal.FRAGMENT),
    ("https://api.example.com/v1?x=", URLRefusal.QUERY),
    ("https://user:sk-secret@api.example.com/v1", URLRefusal.USERINFO),
    ("http://api.example.com/v1", URLRefusal.SCHEME),
    ("ftp://api.example.com/v1", URLRefusal.SCHEME),
    ("file:///etc/passwd", URLRefusal.SCHEME),
    ("https://api.example.com\\@evil/v1", URLRefusal.CHARACTERS),
    ("https://api.example.com/v1 x", URLRefusal.CHARACTERS),
    ("https://api.example.com/v1\r\nX: y", URLRefusal.CHARACTERS),
    ("https://api.example.com/%2e%2e/v1", URLRefusal.CHARACTERS),
    ("https://аpi.example.com/v1", URLRefusal.CHARACTERS),  # noqa: RUF001 - a Cyrillic a
    ("https://api.example.com/a/../v1", URLRefusal.PATH),
    ("https://localhost/v1", URLRefusal.LOCAL_NAME),
    ("https://metadata/computeMetadata", URLRefusal.LOCAL_NAME),
    ("https://metadata.google.internal/", URLRefusal.LOCAL_NAME),
    ("https://printer.local/", URLRefusal.LOCAL_NAME),
    ("https://127.0.0.1:9100/metrics", URLRefusal.LOOPBACK),
    ("https://[::1]:9100/", URLRefusal.LOOPBACK),
    ("https://[::ffff:127.0.0.1]/", URLRefusal.LOOPBACK),
    ("https://127.1/", URLRefusal.HOST),
    ("https://2130706433/", URLRefusal.HOST),
    ("https://0x7f000001/", URLRefusal.HOST),
    ("https://169.254.169.254/latest/meta-data", URLRefusal.LINK_LOCAL),
    ("https://[fe80::1]/", URLRefusal.LINK_LOCAL),
    ("https://[64:ff9b::a9fe:a9fe]/", URLRefusal.LINK_LOCAL),  # NAT64 form of the metadata address
    ("https://10.0.0.1/v1", URLRefusal.PRIVATE),
    ("https://172.16.5.4/v1", URLRefusal.PRIVATE),
    ("https://192.168.1.1/v1", URLRefusal.PRIVATE),
    ("https://[fd00::2]/v1", URLRefusal.PRIVATE),
    ("https://100.64.0.1/v1", URLRefusal.SHARED),
    ("https://0.0.0.0/v1", URLRefusal.UNSPECIFIED),
    ("https://224.0.0.1/v1", URLRefusal.MULTICAST),
    ("https://240.0.0.1/v1", URLRefusal.RESERVED),
    ("https://[2001::1]/v1", URLRefusal.RESERVED),  # Teredo
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_a_plain_platform_refuses_these_provider_urls(url, reason):
    with pytest.raises(ProviderURLError) as e:
        STRICT.check_url(url)
    assert e.value.reason is reason
    assert f"({reason.value})" in str(e.value)
    assert "sk-secret" not in str(e.value)  # the message never repeats the URL


def test_public_https_urls_pass_and_are_made_canonical():
    u = STRICT.check_url("HTTPS://API.Example.COM:443/v1/")
    assert (u.scheme, u.host, u.port, u.path, u.url) == (
        "https",
        "api.example.com",
        443,
        "/v1",
        "https://api.example.com/v1",
    )
    assert STRICT.check_url("https://8.8.8.8/v1").ip == ipaddress.ip_address("8.8.8.8")  # decided, not called


def test_the_operator_allows_hosts_by_name_and_port_only():
    policy = URLPolicy(
        allowed=("example.com",),
        http=(HostRule.parse("10.0.0.5:8000"), HostRule.parse("llm.lan:80")),
        private=(HostRule.parse("10.0.0.5:8000"), HostRule.parse("llm.lan")),
    )
    assert policy.check_url("https://api.example.com/v1").host == "api.example.com"
    assert policy.check_url("http://10.0.0.5:8000/v1").port == 8000
    assert policy.check_url("http://llm.lan/v1").host == "llm.lan"
    for url, reason in (
        ("https://evil.com/v1", URLRefusal.HOST_NOT_ALLOWED),
        ("https://example.com.evil.com/v1", URLRefusal.HOST_NOT_ALLOWED),
        ("http://10.0.0.5:8001/v1", URLRefusal.SCHEME),
        ("https://10.0.0.5:8001/v1", URLRefusal.HOST_NOT_ALLOWED),  # another port of an allowed host
    ):
        with pytest.raises(ProviderURLError) as e:
            policy.check_url(url)
        assert e.value.reason is reason, url
    anywhere = URLPolicy(private=policy.private)
    for url in ("https://10.0.0.5:8001/v1", "https://10.0.0.6:8000/v1"):
        with pytest.raises(ProviderURLError) as e:
            anywhere.check_url(url)
        assert e.value.reason is URLRefusal.PRIVATE, url
    # Networks too, and an allowance never extends to another host.
    net = URLPolicy(private=(HostRule.parse("10.1.0.0/16:443"),))
    assert net.address_refusal("x.example.com", 443, ipaddress.ip_address("10.1.2.3")) is None
    assert net.address_refusal("x.example.com", 80, ipaddress.ip_address("10.1.2.3")) is URLRefusal.PRIVATE


def test_the_platform_own_addresses_are_refused_even_when_public():
    s = ZakiSettings(network_pool="10.250.0.0/16")
    policy = URLPolicy.from_settings(s)
    assert ipaddress.ip_network("10.250.0.0/16") in policy.platform
    # The host's own interface addresses (read from /proc): loopback and the Docker bridge here.
    assert ipaddress.ip_network("127.0.0.1/32") in policy.platform
    public_host = URLPolicy(platform=(ipaddress.ip_network("8.8.8.8/32"),))
    assert public_host.address_refusal("api.example.com", 443, ipaddress.ip_address("8.8.8.8")) is (
        URLRefusal.PLATFORM
    )
    assert address_class(ipaddress.ip_address("8.8.8.8")) is None


# --- event validation: a typed reason ----------------------------------------------------------


def _requested(base_url: str) -> bytes:
    return json.dumps(
        {
            "request_id": new_user("req"),
            "user_id": new_user(),
            "bot_token": "123456789:" + "a" * 35,
            "provider": {"name": "mine", "base_url": base_url, "api_key": "sk-own"},
        }
    ).encode()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9100/metrics#", "fragment"),
        ("https://api.example.com/v1?a=b", "query"),
        ("https://me:pw@api.example.com/v1", "userinfo"),
        ("http://api.example.com/v1", "scheme"),
        ("https://localhost:9100/", "local_name"),
        ("https://169.254.169.254/", "link_local"),
        ("https://10.0.0.1/", "private"),
    ],
)
def test_events_with_a_refused_provider_url_are_malformed_with_the_reason(url, reason):
    with pytest.raises(MalformedEvent) as e:
        decode_event(InstanceRequested, _requested(url))
    assert e.value.error.startswith("provider.base_url:"), e.value.error
    assert f"provider URL refused ({reason})" in e.value.error
    update = json.dumps({"user_id": "alice", "provider": {"name": "mine", "base_url": url}}).encode()
    with pytest.raises(MalformedEvent) as e:
        decode_event(InstanceUpdate, update)
    assert f"provider URL refused ({reason})" in e.value.error
    assert "pw" not in e.value.error.split("refused")[1]


async def test_the_provisioner_answers_the_attack_with_invalid_provider_url(provisioner, platform, fakes):
    ev = InstanceRequested(
        request_id=new_user("req"),
        user_id=new_user(),
        bot_token=fakes.bot(),
        provider=ProviderSettings.model_construct(
            name="mine", base_url="http://127.0.0.1:9100/metrics#", api="openai-completions", models=[]
        ),
    )
    subject, failed = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=30)
    assert subject == subjects.INSTANCE_FAILED
    assert failed.reason == FailureReason.INVALID_PROVIDER_URL
    assert "provider URL refused (fragment)" in failed.message


async def test_a_stored_provider_url_refused_today_does_not_keep_the_gateway_down(
    provisioner, platform, fakes, store
):
    """A record from an older database (or before tighter settings) holds a URL that today's
    rules refuse: the gateway still starts (Telegram works); only its model calls are refused."""
    user = new_user()
    ev = InstanceRequested(
        request_id=new_user("req"),
        user_id=user,
        bot_token=fakes.bot(),
        image=STANDIN_IMAGE,
        provider=ProviderSettings(
            name="mine", base_url="https://api.example.com/v1", api="openai-completions", api_key="sk-x"
        ),
    )
    subject, _ = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY
    await store.instances.update_one({"_id": user}, {"$set": {"provider.base_url": "http://127.0.0.1:9/#"}})
    subject, ready = await platform.call(
        subjects.INSTANCE_RESTART, InstanceCommand(user_id=user, reason="test"), timeout=120
    )
    assert subject == subjects.INSTANCE_READY, ready
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))


# --- call time: records that bypassed validation (an older database) --------------------------------


@pytest.fixture
async def loopback_service():
    """A loopback-only service like the platform's metrics: counts who reached it."""
    hits: list[str] = []

    async def page(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="zaki_secret_metric 1\n")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield port, hits
    await runner.cleanup()


async def _call_own(store, keyring_spec, host_net, service_env, base_url: str, **headers: str):
    _, cred = await fake_instance(
        store,
        keyring_spec,
        host_net,
        provider={"name": "mine", "base_url": base_url, "api": "openai-completions"},
    )
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(
            f"{broker_url(service_env)}/p/mine/chat/completions",
            headers={"Authorization": f"Bearer {cred}", **headers},
            json=chat_body("hi"),
        )


async def test_the_attack_of_the_issue_is_refused_at_call_time(
    broker, store, service_env, keyring_spec, host_net, loopback_service, fakes
):
    port, hits = loopback_service
    for base_url, reason, code in (
        (f"http://127.0.0.1:{port}/metrics#", "fragment", "provider_url_refused"),  # the issue's attack
        (f"http://127.0.0.1:{port}/metrics?", "query", "provider_url_refused"),
        (f"http://127.0.0.1:{port}/metrics", "scheme", "provider_url_refused"),
        (f"https://127.0.0.1:{port}/metrics", "loopback", "provider_url_refused"),
        (f"https://localhost:{port}/metrics", "local_name", "provider_url_refused"),
        (f"https://u:p@127.0.0.1:{port}/", "userinfo", "provider_url_refused"),
        # The fake provider's host, another port: not what the operator allowed.
        (f"http://{fakes.host}:{port}/v1", "scheme", "provider_url_refused"),
        (f"https://{fakes.host}:{port}/v1", "private", "provider_url_refused"),
        ("https://169.254.169.254/latest/meta-data", "link_local", "provider_url_refused"),
        ("https://10.0.0.1/v1", "private", "provider_url_refused"),
    ):
        r = await _call_own(store, keyring_spec, host_net, service_env, base_url)
        assert r.status_code == 403, (base_url, r.text)
        err = r.json()["error"]
        assert err["code"] == code and f"({reason})" in err["message"], (base_url, err)
        assert "zaki_secret_metric" not in r.text
    assert hits == []  # nothing reached the loopback-only service


async def test_an_operator_provider_with_a_refused_url_is_not_called(
    broker, store, service_env, keyring_spec, host_net, loopback_service
):
    port, hits = loopback_service
    name = f"p{uuid.uuid4().hex[:8]}"
    # As an older database could hold it: written past `zaki providers add`'s check.
    key_enc = KeyRing.from_spec(keyring_spec).encrypt("sk-x", provider_key_context(name))
    await store.add_provider(
        name, {"base_url": f"http://127.0.0.1:{port}/#", "api": "openai-completions", "key_enc": key_enc}
    )
    _, cred = await fake_instance(store, keyring_spec, host_net)
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(
            f"{broker_url(service_env)}/p/{name}/chat/completions",
            headers={"Authorization": f"Bearer {cred}"},
            json=chat_body("hi"),
        )
    assert r.status_code == 403 and r.json()["error"]["code"] == "provider_url_refused", r.text
    assert hits == []


# --- call time: names are resolved, checked and pinned ---------------------------------------------


async def test_a_name_resolving_to_loopback_is_refused():
    with pytest.raises(EgressRefused) as e:
        await GuardedResolver(STRICT).resolve("localhost", 443, socket.AF_UNSPEC)
    assert e.value.reason is URLRefusal.LOOPBACK
    # Allowed by name for one port only.
    allowed = GuardedResolver(URLPolicy(private=(HostRule.parse("localhost:8443"),)))
    got = await allowed.resolve("localhost", 8443, socket.AF_UNSPEC)
    assert got and all(
        ipaddress.ip_address(a["host"]).is_loopback and a["hostname"] == "localhost" for a in got
    )
    with pytest.raises(EgressRefused):
        await allowed.resolve("localhost", 8444, socket.AF_UNSPEC)


class ScriptedResolver(GuardedResolver):
    """The guarded resolver over a scripted DNS (no query leaves this machine)."""

    def __init__(self, policy: URLPolicy, answers: list[list[str]]) -> None:
        super().__init__(policy)
        self.answers = answers
        self.lookups = 0

    async def _getaddrinfo(self, host, port, family):
        ips = self.answers[min(self.lookups, len(self.answers) - 1)]
        self.lookups += 1
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips]


async def test_the_connection_goes_to_the_checked_address_only(loopback_service):
    port, hits = loopback_service
    # A rebinding name: its answer turns to loopback. The resolver refuses it, aiohttp reports
    # the refusal, and the loopback service sees nothing.
    rebinding = ScriptedResolver(STRICT, [["127.0.0.1"]])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=rebinding)) as s:
        with pytest.raises(aiohttp.ClientConnectorError) as e:
            await s.get(f"http://rebind.example.com:{port}/")
    refused = refusal_of(e.value)
    assert refused is not None and refused.reason is URLRefusal.LOOPBACK
    assert hits == [] and rebinding.lookups == 1
    # Allowed by name: one lookup per connection, the connection goes to that address, and the
    # server sees the name (Host header; SNI for https).
    pinned = ScriptedResolver(
        URLPolicy(private=(HostRule.parse(f"pinned.example.com:{port}"),)), [["127.0.0.1"]]
    )
    seen: list[str] = []

    async def on_request_start(session, ctx, params) -> None:
        seen.append(params.url.host)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=pinned, use_dns_cache=False), trace_configs=[trace]
    ) as s:
        async with s.get(f"http://pinned.example.com:{port}/x") as r:
            assert r.status == 200
    assert hits == ["/x"] and pinned.lookups == 1 and seen == ["pinned.example.com"]


# --- what is forwarded -------------------------------------------------------------------------------

HOSTILE = {
    "X-Forwarded-For": "10.0.0.1",
    "X-Forwarded-Host": "evil",
    "X-Forwarded-Proto": "https",
    "X-Real-IP": "10.0.0.1",
    "Forwarded": "for=10.0.0.1",
    "Metadata-Flavor": "Google",
    "X-aws-ec2-metadata-token": "t",
    "X-OpenClaw-Scopes": "operator.admin",
    "Cookie": "session=1",
    "X-Custom": "1",
    "Accept-Encoding": "gzip, br",
    "OpenAI-Organization": "org-x",
}


def test_only_allowlisted_request_headers_are_forwarded():
    out = {
        k.lower(): v for k, v in forwarded_headers({**HOSTILE, "Content-Type": "application/json"}).items()
    }
    assert out == {"content-type": "application/json", "accept-encoding": "identity"}


async def test_hostile_headers_do_not_reach_the_provider(
    broker, store, service_env, keyring_spec, fakes, host_net
):
    _, cred = await fake_instance(store, keyring_spec, host_net)
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(
            f"{broker_url(service_env)}/p/zaki/chat/completions",
            headers={
                "Authorization": f"Bearer {cred}",
                "OpenAI-Beta": "assistants=v2",
                "X-Stainless-Lang": "python",
                **HOSTILE,
            },
            json=chat_body("headers"),
        )
    assert r.status_code == 200, r.text
    got = {k.lower(): v for k, v in fakes.llm.headers[-1].items()}
    for h in HOSTILE:
        if h.lower() != "accept-encoding":
            assert h.lower() not in got, h
    assert got["accept-encoding"] == "identity"  # answers come uncompressed, so they are counted
    assert got["openai-beta"] == "assistants=v2" and got["x-stainless-lang"] == "python"
    assert got["authorization"] == f"Bearer {service_env['ZAKI_LLM_API_KEY']}"
    assert got["host"] == f"{fakes.host}:{fakes.llm_port}"


async def test_a_redirect_is_passed_back_not_followed(
    broker, store, service_env, keyring_spec, fakes, host_net
):
    calls, redirects = len(fakes.llm.calls), fakes.llm.redirects
    r = await _call_own(
        store, keyring_spec, host_net, service_env, f"http://{fakes.host}:{fakes.llm_port}/redirect/v1"
    )
    assert r.status_code == 307, r.text
    assert r.headers["location"].endswith("/v1/chat/completions")
    await asyncio.sleep(0.2)
    assert fakes.llm.redirects == redirects + 1 and len(fakes.llm.calls) == calls


async def test_a_default_provider_at_a_refused_url_is_not_seeded(store, keyring_spec):
    name = f"p{uuid.uuid4().hex[:8]}"
    s = ZakiSettings(
        llm_provider_name=name,
        llm_base_url="http://127.0.0.1:9100/v1",
        llm_api_key="sk-x",
        secret_keys=keyring_spec,
    )
    keys = KeyRing.from_spec(keyring_spec)
    assert not await seed_default_provider(store, keys, s)  # a plain platform: loopback over http
    assert await store.get_provider(name) is None
    allowed = s.model_copy(
        update={"broker_http_hosts": "127.0.0.1:9100", "broker_private_hosts": "127.0.0.1:9100"}
    )
    assert await seed_default_provider(store, keys, allowed)
    assert (await store.get_provider(name))["base_url"] == "http://127.0.0.1:9100/v1"
