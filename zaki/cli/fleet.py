"""``zaki fleet upgrade --image I [--canary 5%] [--waves 25%,50%,100%] [--soak-s N]``,
``zaki fleet status [ID]``, ``zaki fleet resume ID``, ``zaki fleet abort ID``: fleet upgrades
in canary waves (services/fleet). The runner runs in this process; its state is in the store,
so a killed one is resumed by ``resume``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

ACTIONS = ["upgrade", "status", "resume", "abort"]


def register(sub: Any) -> None:
    p = sub.add_parser("fleet", help="upgrade every instance in canary waves, rolled back on a failed gate")
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("rollout", nargs="?", help="rollout id (status, resume, abort)")
    p.add_argument("--image", help="the new gateway image (one of ZAKI_ALLOWED_IMAGES)")
    p.add_argument("--canary", default="5%", help="share of the fleet upgraded first (default 5%%)")
    p.add_argument("--waves", default="25%,50%,100%", help="cumulative shares after the canary")
    p.add_argument("--soak-s", type=float, default=300.0, help="seconds each wave is watched (default 300)")
    p.add_argument("--max-failures", type=int, default=0, help="bad instances a gate tolerates (default 0)")
    p.add_argument("--parallel", type=int, default=4, help="upgrades at once within a wave (default 4)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one upgrade's outcome")
    p.set_defaults(fn=run)


class Printer:
    """A progress bar on a terminal; plain lines otherwise (logs, CI)."""

    def __init__(self, stream: Any = None) -> None:
        self.out = stream or sys.stderr
        self.tty = self.out.isatty()
        self.t0 = time.monotonic()

    def __call__(self, doc: dict[str, Any], step: str) -> None:
        from services.fleet.plan import progress_line
        from services.fleet.runner import counts

        c = counts(doc)
        total = len(doc["instances"])
        done = sum(c.get(s, 0) for s in ("upgraded", "recorded", "failed", "reverted", "skipped"))
        summary = " ".join(f"{k}={v}" for k, v in sorted(c.items()))
        wave = f"wave {min(doc['wave'] + 1, len(doc['groups']))}/{len(doc['groups'])}"
        elapsed = f"{time.monotonic() - self.t0:5.0f} s"
        if self.tty:
            line = f"\r{progress_line(done, total)} {wave} {doc['state']} {step:<18} {summary} {elapsed}"
            print(line.ljust(120), end="", file=self.out, flush=True)
            if doc["state"] in ("completed", "halted", "aborted"):
                print(file=self.out)
        else:
            print(
                f"{doc['_id']} {wave} {doc['state']} {step} {done}/{total} {summary} {elapsed}", file=self.out
            )


def run(args: argparse.Namespace) -> int:
    from services.fleet.plan import PlanError
    from services.fleet.runner import RolloutBusy

    if args.action == "upgrade" and not args.image:
        print("fleet upgrade needs --image", file=sys.stderr)
        return 2
    if args.action in ("resume", "abort") and not args.rollout:
        print(f"fleet {args.action} needs a rollout id", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args))
    except (PlanError, RolloutBusy) as e:
        print(f"fleet: {e}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace) -> int:
    from services.fleet import plan as fp
    from services.fleet import runner as fr
    from shared import audit
    from shared.client import PlatformClient
    from shared.settings import ZakiSettings
    from shared.store import Store
    from zaki.cli.audit import cli_actor

    s = ZakiSettings()
    store = Store(s.mongo_url, s.mongo_db)
    try:
        if args.action == "status":
            return await _status(store, args.rollout)
        client = await PlatformClient.connect(s.nats_url)
        audit.install(client.nc, s.audit_retention_days, s.stream_replicas)
        try:
            if args.action == "abort":
                doc = await fr.abort(store, args.rollout)
                await audit.action(cli_actor(), "fleet.abort", None, {"rollout": doc["_id"]})
                print(f"{doc['_id']}: abort asked; its runner (or `zaki fleet resume`) rolls it back")
                return 0
            if args.action == "upgrade":
                doc = await fr.create(
                    store,
                    args.image,
                    fp.parse_share(args.canary),
                    fp.parse_waves(args.waves),
                    soak_s=args.soak_s,
                    actor=cli_actor(),
                    allowed=s.images(),
                    max_failures=args.max_failures,
                    parallel=args.parallel,
                )
                detail = {
                    "rollout": doc["_id"],
                    "image": args.image,
                    "groups": [len(g["users"]) for g in doc["groups"]],
                }
                await audit.action(cli_actor(), "fleet.upgrade", None, detail)
                print(
                    f"rollout {doc['_id']}: {len(doc['instances'])} instances in {len(doc['groups'])} groups"
                )
                rid = doc["_id"]
            else:
                rid = args.rollout
                await audit.action(cli_actor(), "fleet.resume", None, {"rollout": rid})
            runner = fr.Runner(
                store, client, on_progress=Printer(), outcome_timeout=args.timeout, lease_s=s.fleet_lease_s
            )
            final = await runner.run(rid)
        finally:
            await client.close()
        print(f"rollout {final['_id']}: {final['state']} {fr.counts(final)}")
        for r in final.get("reasons") or []:
            print(f"  {r}")
        return 0 if final["state"] == "completed" else 1
    finally:
        await store.close()


async def _status(store: Any, rid: str | None) -> int:
    from services.fleet import runner as fr

    if rid:
        docs = [await fr.get(store, rid)]
        if docs[0] is None:
            print(f"no rollout {rid}", file=sys.stderr)
            return 1
    else:
        ids = [
            d["_id"] async for d in fr.rollouts(store).find({}, {"_id": 1}).sort("created_at", -1).limit(10)
        ]
        docs = [await fr.get(store, i) for i in ids]
    for d in docs:
        print(
            f"{d['_id']}  {d['state']:<12} image={d['image']} wave={d['wave']}/{len(d['groups'])} {fr.counts(d)}"
        )
        if rid:
            for u, e in sorted(d["instances"].items()):
                print(f"  {u:<28} {e['status']:<10} from={e.get('from_image')} {e.get('error') or ''}")
    return 0
