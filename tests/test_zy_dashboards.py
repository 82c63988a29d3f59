"""Runs late: a real Prometheus scrapes the running services (after the flows above),
evaluates the rules, and every dashboard panel's query parses and returns data."""

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy" / "grafana"))
from dashboards import SUSPENDED, SUSPENDED_SHARE, panel_queries  # noqa: E402

from tests.conftest import require_tool  # noqa: E402
from zaki.stack import free_port, wait_for_port  # noqa: E402

PROMETHEUS = shutil.which("prometheus")


def test_committed_dashboards_are_up_to_date():
    out = subprocess.run(
        [sys.executable, str(ROOT / "deploy/grafana/dashboards.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


@require_tool(PROMETHEUS, "prometheus (Debian's prometheus)")
async def test_every_panel_query_returns_data(
    provisioner, monitor, proxy, broker, platform, fakes, store, tmp_path, service_env, keyring_spec, host_net
):
    from services.gateway_proxy import keys
    from shared import subjects
    from shared.events import InstanceDelete, InstanceRequested, InstanceSuspend
    from tests.conftest import STANDIN_IMAGE, broker_url, new_user
    from tests.test_broker import chat_body, fake_instance

    # A small flow of its own, so the panels have something to show even when run alone.
    ev = InstanceRequested(
        request_id=new_user("req"), user_id=new_user("dash"), bot_token=fakes.bot(), image=STANDIN_IMAGE
    )
    subject, _ = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY
    _, key = await keys.create_key(store, ev.user_id, {"chat"})
    # And a suspended one: the suspended panels must count it (not merely answer 0).
    asleep = InstanceRequested(
        request_id=new_user("req"), user_id=new_user("dash"), bot_token=fakes.bot(), image=STANDIN_IMAGE
    )
    subject, _ = await platform.call(subjects.INSTANCE_REQUESTED, asleep, timeout=120)
    assert subject == subjects.INSTANCE_READY
    subject, _ = await platform.call(
        subjects.INSTANCE_SUSPEND, InstanceSuspend(user_id=asleep.user_id), timeout=60
    )
    assert subject == subjects.INSTANCE_SUSPENDED

    _, broker_cred = await fake_instance(store, keyring_spec, host_net)

    async def traffic() -> None:
        async with httpx.AsyncClient(base_url=proxy.address, timeout=30) as http:
            body = {"model": "openclaw", "messages": [{"role": "user", "content": "dash"}]}
            await http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            await http.get("/v1/models")  # 401
        async with httpx.AsyncClient(base_url=broker_url(service_env), timeout=30) as http:
            await http.post(
                "/p/zaki/chat/completions",
                json=chat_body("dash"),
                headers={"Authorization": f"Bearer {broker_cred}"},
            )
            await http.post("/p/zaki/chat/completions", json=chat_body("dash"))  # refused: no credential

    def target(url: str) -> str:
        return urlparse(url).netloc

    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "deploy/prometheus/rules.yml")],
        "scrape_configs": [
            {"job_name": "zaki-provisioner", "static_configs": [{"targets": [target(provisioner.address)]}]},
            {"job_name": "zaki-monitor", "static_configs": [{"targets": [target(monitor.address)]}]},
            {"job_name": "zaki-gateway-proxy", "static_configs": [{"targets": [target(proxy.metrics)]}]},
            {"job_name": "zaki-llm-broker", "static_configs": [{"targets": [target(broker.address)]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    prom = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port, prom, "prometheus")
        queries = [(d, t, e.replace("$__rate_interval", "30s")) for d, t, e in panel_queries()]
        missing: dict[str, str] = {}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for _ in range(40):  # up to ~40 s for enough samples
                await traffic()
                missing = {}
                for dash, title, expr in queries:
                    r = await http.get("/api/v1/query", params={"query": expr})
                    body = r.json()
                    assert body["status"] == "success", (dash, title, body)  # the query parses
                    result = body["data"]["result"]
                    counted = title not in (SUSPENDED, SUSPENDED_SHARE) or (
                        result and float(result[0]["value"][1]) > 0
                    )
                    if not result or not counted:
                        missing[f"{dash}: {title}"] = expr
                if not missing:
                    break
                await asyncio.sleep(1)
        assert not missing, missing
    finally:
        prom.terminate()
        prom.wait(10)
        await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=ev.user_id, purge=True))
        await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=asleep.user_id, purge=True))
