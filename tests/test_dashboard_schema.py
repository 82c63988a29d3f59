"""Fuzzes the dashboard API from its own OpenAPI document (schemathesis): every operation, with
generated valid and invalid input, as a logged-in user, must answer what the document promises
(status, content type, body schema) and never a server error. A small example budget keeps it fast."""

from __future__ import annotations

import uuid

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import ignored_auth, positive_data_acceptance

from tests.test_dashboard_api import ORIGIN, PASSWORD, shared_dashboard

EXAMPLES = 6  # per operation and mode: enough to find a crash or a drift, fast enough for the suite
SKIPPED = {
    # Log-out would end the session the other operations run with.
    ("POST", "/api/auth/logout"),
    # A live stream; this user has no agent, so it is a plain 404 (checked in the API tests).
    ("GET", "/api/agent/events"),
}


# Schema-valid input these operations refuse by rules a schema cannot state (400 with a typed
# code): a weak password, a confirmation that is not the username, a token Telegram does not
# know, a model the operator does not allow.
BUSINESS_RULES = {
    ("POST", "/api/auth/signup"),
    ("POST", "/api/me/password"),
    ("DELETE", "/api/me"),
    ("POST", "/api/agent"),
    ("PATCH", "/api/agent"),
}


@pytest.fixture(scope="module")
def session_headers(stack, service_env) -> dict[str, str]:
    url = shared_dashboard(stack, service_env).address
    r = httpx.post(
        f"{url}/api/auth/signup",
        json={"username": f"fuzz-{uuid.uuid4().hex[:8]}", "password": PASSWORD},
        headers={"Origin": ORIGIN},
    )
    assert r.status_code == 201, r.text
    # A bearer session (no cookie, so no Origin rule), from an address of its own (log-in throttle).
    return {"Authorization": f"Bearer {r.cookies['zaki_dash']}", "X-Forwarded-For": "192.0.2.77"}


def _fuzzer(op, mode: GenerationMode, headers: dict[str, str], excluded: list):
    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case) -> None:
        case.call_and_validate(headers=headers, excluded_checks=excluded)

    return run


def test_dashboard_api_matches_its_openapi_document(stack, service_env, session_headers) -> None:
    url = shared_dashboard(stack, service_env).address
    schema = schemathesis.openapi.from_url(f"{url}/api/openapi.json")
    failures: list[str] = []
    tested = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if (op.method.upper(), op.path) in SKIPPED:
            continue
        excluded = [ignored_auth]  # credentials come from session_headers, not from the generator
        if (op.method.upper(), op.path) in BUSINESS_RULES:
            excluded.append(positive_data_acceptance)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzzer(op, mode, session_headers, excluded)()
            except Unsatisfiable:
                pass  # nothing to make invalid (an operation without parameters)
            except Exception as e:  # keep going: report every operation that fails
                failures.append(f"{op.method.upper()} {op.path} ({mode.value}): {e!r}"[:1500])
        tested += 1
    assert tested >= 30
    assert not failures, "\n\n".join(failures)


def test_every_protected_operation_refuses_a_caller_without_a_session(stack, service_env) -> None:
    url = shared_dashboard(stack, service_env).address
    doc = httpx.get(f"{url}/api/openapi.json").json()
    checked = 0
    with httpx.Client(base_url=url, headers={"Origin": ORIGIN}) as anon:
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                if "security" not in op:
                    continue
                concrete = (
                    path.replace("{name}", "SOUL.md")
                    .replace("{key_id}", "k1")
                    .replace("{user_id}", "u1")
                    .replace("{rollout_id}", "r1")
                )
                body = {} if "requestBody" in op else None
                r = anon.request(method.upper(), concrete, json=body)
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                assert r.json()["error"]["code"] == "not_authenticated"
                r = anon.request(
                    method.upper(), concrete, json=body, headers={"Authorization": "Bearer forged"}
                )
                assert r.status_code == 401, (method, path)
                checked += 1
    assert checked >= 28
