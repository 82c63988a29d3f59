"""From inside a user's gateway container: non-root, no capabilities, no Docker socket,
and no way to the other tenant's gateway, MongoDB, NATS, the proxy or the model provider
(only the LLM broker). tests/test_egress.py covers the egress policy's address classes."""

import asyncio
import json
from urllib.parse import urlparse

from shared import subjects
from shared.events import InstanceDelete, InstanceRequested
from tests.conftest import STANDIN_IMAGE, new_user

PROBE_JS = r"""
const net = require("node:net");
const targets = JSON.parse(process.argv[1]);
let left = targets.length;
const out = {};
for (const [name, host, port] of targets) {
  const s = net.connect({ host, port, timeout: 2000 });
  const done = (r) => { if (out[name] === undefined) { out[name] = r; s.destroy(); if (--left === 0) console.log(JSON.stringify(out)); } };
  s.on("connect", () => done("open"));
  s.on("timeout", () => done("timeout"));
  s.on("error", (e) => done(e.code || "error"));
}
"""


async def test_a_tenant_container_cannot_reach_anything_it_should_not(
    provisioner, proxy, platform, fakes, docker_client, service_env
):
    users = []
    try:
        for _ in range(2):
            ev = InstanceRequested(
                request_id=new_user("req"),
                user_id=new_user("iso"),
                bot_token=fakes.bot(),
                image=STANDIN_IMAGE,
            )
            subject, ready = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
            assert subject == subjects.INSTANCE_READY
            users.append((ev.user_id, ready))
        _, ready_b = users[1]
        ca, cb = (docker_client.containers.get(f"zaki-user-{u}") for u, _ in users)
        b_ip = next(iter(cb.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
        a_gateway = next(iter(ca.attrs["NetworkSettings"]["Networks"].values()))["Gateway"]
        nats_port = urlparse(service_env["ZAKI_NATS_URL"]).port
        mongo_port = urlparse(service_env["ZAKI_MONGO_URL"]).port
        proxy_port = urlparse(proxy.address).port
        targets = [
            ("other tenant's container", b_ip, 18789),
            ("other tenant's published port via host", a_gateway, ready_b.port),
            ("NATS via host", a_gateway, nats_port),
            ("MongoDB via host", a_gateway, mongo_port),
            ("proxy via host", a_gateway, proxy_port),
            ("NATS via docker0", fakes.host, nats_port),
            ("MongoDB via docker0", fakes.host, mongo_port),
            ("other tenant's port on loopback", "127.0.0.1", ready_b.port),
            ("model provider on docker0 (the broker's job)", fakes.host, fakes.llm_port),
        ]
        # In a thread: the fakes answering the positive control below live on this event loop.
        result = await asyncio.to_thread(
            ca.exec_run, ["node", "-e", PROBE_JS, json.dumps(targets)], user="1000:1000"
        )
        reached = json.loads(result.output.decode().strip().splitlines()[-1])
        assert set(reached) == {t[0] for t in targets}
        assert all(v != "open" for v in reached.values()), reached

        # Positive control: the LLM broker (host.docker.internal) is meant to be reachable.
        broker = json.dumps([["broker", fakes.host, int(service_env["ZAKI_BROKER_PORT"])]])
        check = await asyncio.to_thread(ca.exec_run, ["node", "-e", PROBE_JS, broker], user="1000:1000")
        assert json.loads(check.output.decode().strip().splitlines()[-1]) == {"broker": "open"}

        status = ca.exec_run(["cat", "/proc/1/status"]).output.decode()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert fields["Uid"].split()[0] == "1000"
        assert int(fields["CapEff"].strip(), 16) == 0 and int(fields["CapBnd"].strip(), 16) == 0
        assert fields["NoNewPrivs"].strip() == "1"
        assert ca.exec_run(["ls", "/var/run/docker.sock"]).exit_code != 0
        assert ca.exec_run(["touch", "/usr/local/bin/x"]).exit_code != 0  # read-only root file system
    finally:
        for u, _ in users:
            await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=u, purge=True))
