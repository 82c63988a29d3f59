"""Hostile input: every event schema and the proxy's routes under generated input.
Nothing crashes, nothing answers 500, no secret comes back."""

import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.gateway_proxy import keys
from shared.bus import MalformedEvent, decode_event
from shared.events import COMMAND_MODELS, OUTCOME_MODELS
from shared.validation import USER_ID_RE

MODELS = list({**COMMAND_MODELS, **OUTCOME_MODELS}.values())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "request_id",
        "user_id",
        "bot_token",
        "model",
        "provider",
        "image",
        "reason",
        "purge",
        "schema_version",
        "x",
    ]
)
# Generated inputs per test: enough to find a crash or a leak, small enough for the suite's
# 30-minute budget on 2 cores.
FUZZ_CASES = 4_000
event_like = st.dictionaries(field_names, json_values | st.text(max_size=300), max_size=8)


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(MODELS),
    st.one_of(st.binary(max_size=300), event_like.map(lambda d: json.dumps(d).encode())),
)
def test_every_event_schema_refuses_garbage_with_a_typed_error(model, data):
    try:
        event = decode_event(model, data)
    except MalformedEvent as e:
        assert e.reason in ("not_json", "not_an_object", "invalid_schema", "unsupported_version")
        return
    user_id = getattr(event, "user_id", None)
    if user_id is not None and model in COMMAND_MODELS.values():
        assert USER_ID_RE.fullmatch(user_id)  # nothing unsafe reaches disk or Docker


methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
paths = st.one_of(
    st.sampled_from(
        ["/v1/chat/completions", "/v1/models", "/v1/responses", "/tools/invoke", "/ws", "/healthz"]
    ),
    st.text(alphabet="/abcdefv1._-%?=&", min_size=1, max_size=60).map(lambda p: "/" + p.lstrip("/")),
)
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)
headers = st.dictionaries(
    st.sampled_from(
        ["X-Forwarded-User", "X-Forwarded-For", "Host", "Cookie", "Origin", "X-Zaki-User", "Content-Type"]
    ),
    header_values,
    max_size=4,
)
bodies = st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()))
credentials = st.sampled_from(["none", "good", "garbage", "jwt-like"])


async def test_proxy_routes_under_generated_requests(proxy, store):
    from tests.conftest import new_user

    _, good = await keys.create_key(store, new_user(), {"chat", "tools"})
    seen_statuses: set[int] = set()
    async with httpx.AsyncClient(base_url=proxy.address, timeout=10) as http:

        @settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=list(HealthCheck))
        @given(methods, paths, headers, bodies, credentials)
        def one(method, path, extra, body, cred):
            cases.append((method, path, extra, body, cred))

        cases: list = []
        one()
        for method, path, extra, body, cred in cases:
            hdrs = {k: v for k, v in extra.items() if k != "Host"}
            if cred == "good":
                hdrs["Authorization"] = f"Bearer {good}"
            elif cred == "garbage":
                hdrs["Authorization"] = "Bearer zk_" + "a" * 16 + "_" + "b" * 40
            elif cred == "jwt-like":
                hdrs["Authorization"] = "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."
            try:
                r = await http.request(method, path, headers=hdrs, content=body)
            except (httpx.RemoteProtocolError, httpx.LocalProtocolError):
                continue  # e.g. a header the client refuses to send: not the proxy's doing
            seen_statuses.add(r.status_code)
            assert r.status_code < 500 or r.status_code in (502, 503, 504), (
                method,
                path,
                r.status_code,
                r.text,
            )
            assert "Traceback" not in r.text
            assert good not in r.text and good.split("_")[2] not in r.text
    assert len(cases) == FUZZ_CASES
    assert {401, 404} <= seen_statuses
