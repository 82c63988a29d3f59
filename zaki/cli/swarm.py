"""``zaki swarm drain NODE``: empty a node of a Docker Swarm (issue 18, ``ZAKI_RUNTIME=swarm``).

The node is marked drained (the swarm places nothing new there and stops what runs there),
then every user pinned to it is moved with ``instance.move``: backed up, unpinned, and started
on another node with room. Moves run a few at a time; each prints its outcome."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

from zaki.cli.audit import cli_actor
from zaki.cli.common import say, with_platform

PARALLEL_MOVES = 3


def register(sub: Any) -> None:
    p = sub.add_parser("swarm", help="nodes of a Docker Swarm (ZAKI_RUNTIME=swarm)")
    p.add_argument("action", choices=["drain"])
    p.add_argument("node", help="the node's id or hostname")
    p.add_argument("--timeout", type=float, default=300, help="seconds per move")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from services.provisioner.app import make_runtime
    from services.provisioner.swarm_runtime import SwarmRuntime
    from shared import subjects
    from shared.events import InstanceMove

    async def drain(client: Any, settings: Any) -> int:
        runtime = make_runtime(settings)
        if not isinstance(runtime, SwarmRuntime):
            say("zaki swarm needs ZAKI_RUNTIME=swarm")
            return 2
        users = await runtime.drain(args.node)
        say(f"{args.node} drained; moving {len(users)} user(s)")
        gate, failed = asyncio.Semaphore(PARALLEL_MOVES), 0

        async def move(user: str) -> None:
            nonlocal failed
            event = InstanceMove(
                request_id=uuid.uuid4().hex, user_id=user, away_from=args.node, actor=cli_actor()
            )
            async with gate:
                t0 = time.monotonic()
                subject, outcome = await client.call(subjects.INSTANCE_MOVE, event, timeout=args.timeout)
            ok = subject in (subjects.INSTANCE_READY, subjects.INSTANCE_STOPPED, subjects.INSTANCE_SUSPENDED)
            failed += not ok
            where = getattr(outcome, "host", "") or getattr(outcome, "message", "")
            print(f"{user}: {subject.rsplit('.', 1)[-1]} {where} in {time.monotonic() - t0:.1f} s")

        await asyncio.gather(*(move(u) for u in users))
        return 1 if failed else 0

    return asyncio.run(with_platform(drain))
