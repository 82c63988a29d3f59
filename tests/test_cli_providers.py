"""`zaki providers update` and re-adding a revoked provider, against the real broker, NATS and
FerretDB: a change is used by the very next brokered call (announced, no restart)."""

from __future__ import annotations

import json
import uuid

import httpx

from tests.conftest import broker_url
from tests.test_broker import chat_body, fake_instance, zaki_cli


def _provider(service_env: dict[str, str], name: str) -> dict:
    listed = zaki_cli(service_env, "providers", "list")
    assert listed.returncode == 0, listed.stderr
    (doc,) = [d for d in map(json.loads, listed.stdout.splitlines()) if d["name"] == name]
    return doc


async def test_update_changes_the_url_and_models_used_by_the_next_call(
    broker, store, service_env, keyring_spec, fakes, host_net
):
    name = f"u{uuid.uuid4().hex[:8]}"
    fake_root = f"http://{fakes.host}:{fakes.llm_port}"
    key = "sk-upd-" + uuid.uuid4().hex
    # Added with a wrong base URL: the fake has nothing under /wrong.
    out = zaki_cli(
        service_env,
        "providers",
        "add",
        name,
        "--base-url",
        f"{fake_root}/wrong",
        "--models",
        "echo-1",
        stdin=key + "\n",
    )
    assert out.returncode == 0, out.stderr
    _, cred = await fake_instance(store, keyring_spec, host_net)
    url = f"{broker_url(service_env)}/p/{name}/chat/completions"
    headers = {"Authorization": f"Bearer {cred}"}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(url, headers=headers, json=chat_body("before"))
        assert r.status_code != 200  # the broker cached this upstream just now
        version = _provider(service_env, name)["version"]

        out = zaki_cli(
            service_env,
            "providers",
            "update",
            name,
            "--base-url",
            f"{fake_root}/v1",
            "--models",
            "echo-1,echo-2",
        )
        assert out.returncode == 0, out.stderr
        assert "update of base_url, models done" in out.stderr, out.stderr
        # The very next call goes to the new URL (the broker's 30 s cache was dropped).
        r = await http.post(url, headers=headers, json=chat_body("after"))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "echo: after"
        assert fakes.llm.auth_headers[-1] == f"Bearer {key}"  # the key was kept

    doc = _provider(service_env, name)
    assert doc["base_url"] == f"{fake_root}/v1" and doc["models"] == ["echo-1", "echo-2"]
    assert doc["version"] == version + 1 and doc["state"] == "active"
    # The API kind can change too; an update that changes nothing says so and changes nothing.
    out = zaki_cli(service_env, "providers", "update", name, "--api", "anthropic-messages")
    assert out.returncode == 0 and _provider(service_env, name)["api"] == "anthropic-messages", out.stderr
    out = zaki_cli(service_env, "providers", "update", name, "--api", "anthropic-messages")
    assert "nothing to change" in out.stderr and _provider(service_env, name)["version"] == version + 2
    # Bad input gets a clear error and changes nothing.
    out = zaki_cli(service_env, "providers", "update", name, "--base-url", "http://[::1]:1/#x")
    assert out.returncode == 1 and "error:" in out.stderr
    out = zaki_cli(service_env, "providers", "update", f"n{uuid.uuid4().hex[:8]}", "--models", "x")
    assert out.returncode == 1 and "no provider named" in out.stderr
    assert _provider(service_env, name)["base_url"] == f"{fake_root}/v1"


async def test_a_revoked_provider_can_be_added_again(
    broker, store, service_env, keyring_spec, fakes, host_net
):
    name = f"r{uuid.uuid4().hex[:8]}"
    base = f"http://{fakes.host}:{fakes.llm_port}/v1"
    k1, k2 = "sk-one-" + uuid.uuid4().hex, "sk-two-" + uuid.uuid4().hex
    assert (
        zaki_cli(service_env, "providers", "add", name, "--base-url", base, stdin=k1 + "\n").returncode == 0
    )
    # Adding an active provider again is refused, and the message says what to use instead.
    again = zaki_cli(service_env, "providers", "add", name, "--base-url", base, stdin=k2 + "\n")
    assert again.returncode == 1 and "use update" in again.stderr, again.stderr
    assert zaki_cli(service_env, "providers", "revoke", name).returncode == 0

    _, cred = await fake_instance(store, keyring_spec, host_net)
    url = f"{broker_url(service_env)}/p/{name}/chat/completions"
    headers = {"Authorization": f"Bearer {cred}"}
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.post(url, headers=headers, json=chat_body("gone"))).status_code == 404
        readd = zaki_cli(
            service_env, "providers", "add", name, "--base-url", base, "--models", "echo-1", stdin=k2 + "\n"
        )
        assert readd.returncode == 0 and "re-added" in readd.stderr, readd.stderr
        fakes.llm.accepted_keys = {k2}
        try:
            r = await http.post(url, headers=headers, json=chat_body("back"))
        finally:
            fakes.llm.accepted_keys = None
        assert r.status_code == 200, r.text
        assert fakes.llm.auth_headers[-1] == f"Bearer {k2}"
    doc = _provider(service_env, name)
    assert doc["state"] == "active" and doc["models"] == ["echo-1"]
