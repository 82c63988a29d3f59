"""What Docker's HEALTHCHECK costs the host, per gateway container: the old check (a Node start,
`node -e fetch(...)`, every 10 s) next to the images' current one (bash's /dev/tcp, every 30 s),
measured in one run on idle stand-ins, with no check at all as the baseline.

The host's busy CPU (user + nice + system, /proc/stat) over a window, per variant, minus the
baseline's: what the checks add, whatever the machine does underneath.

    python bench/healthcheck_cost.py [--n 20] [--window 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STANDIN = "zaki/standin-gateway:latest"
NODE_CHECK = [
    "CMD",
    "node",
    "-e",
    'fetch("http://127.0.0.1:18789/healthz").then(r=>process.exit(r.ok?0:1)).catch(()=>process.exit(1))',
]
S = 10**9


def busy_seconds() -> float:
    """CPU seconds the whole host has been busy since boot (all cores)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system = (int(x) for x in fields[:3])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def measure(client: docker.DockerClient, n: int, window: float, healthcheck: dict | None) -> float:
    """Busy CPU-seconds per second of the host with *n* stand-ins running *healthcheck*."""
    tag = uuid.uuid4().hex[:8]
    kw = {"healthcheck": healthcheck} if healthcheck else {"healthcheck": {"test": ["NONE"]}}
    cs = [
        client.containers.run(
            STANDIN, detach=True, name=f"zaki-bench-hc-{tag}-{i}", labels={"zaki.bench": "hc"}, **kw
        )
        for i in range(n)
    ]
    try:
        time.sleep(15)  # the boots settle
        b0, t0 = busy_seconds(), time.monotonic()
        time.sleep(window)
        return (busy_seconds() - b0) / (time.monotonic() - t0)
    finally:
        for c in cs:
            c.remove(force=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--window", type=float, default=30)
    args = ap.parse_args()
    client = docker.from_env()
    current = client.images.get(STANDIN).attrs["Config"]["Healthcheck"]
    variants = {
        "no check (baseline)": None,
        "node -e fetch, every 10 s (before)": {"test": NODE_CHECK, "interval": 10 * S, "timeout": 10 * S},
        "bash /dev/tcp, every 10 s": {"test": current["Test"], "interval": 10 * S, "timeout": 10 * S},
        "bash /dev/tcp, every 30 s (now)": {"test": current["Test"], "interval": current["Interval"],
                                            "timeout": current["Timeout"]},
    }  # fmt: skip
    cores: dict[str, float] = {}
    for name, hc in variants.items():
        cores[name] = measure(client, args.n, args.window, hc)
        print(f"{name}: {cores[name]:.3f} cores busy", file=sys.stderr)
    base = cores["no check (baseline)"]
    print(f"\n{args.n} idle stand-ins, {args.window:.0f} s window per variant, one run")
    print("| check | host cores busy | added by the checks, per container (% of a core) | vs before |")
    print("|---|---:|---:|---:|")
    before = cores["node -e fetch, every 10 s (before)"] - base
    for name, c in cores.items():
        added = c - base
        ratio = f"{added / before:.2f}x" if before > 0 and name != "no check (baseline)" else ""
        print(f"| {name} | {c:.3f} | {100 * added / args.n:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
