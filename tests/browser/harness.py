"""What the dashboard's browser tests stand on: a platform of its own (NATS, FerretDB, the four
services and the dashboard, stand-in gateways), the dashboard on its own origin and the proxy on
another (never merged: security review H4), and Debian's Chromium driven headless by Playwright
(never a downloaded browser)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.browser.front import Front
from tests.conftest import REAL_IMAGE, SESSION, STANDIN_IMAGE
from tests.faults import FaultPlatform
from zaki.stack import REPO, free_port, wait_for_port

CHROMIUM = os.environ.get("ZAKI_CHROMIUM", "/usr/bin/chromium")
# No sandbox: the tests run as root. The rest keeps Chromium off the network (only loopback is ours).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--metrics-recording-only",
]
SHOTS = REPO / "docs" / "screenshots"


def shots_dir() -> Path:
    """Where screenshots go: docs/screenshots/ (committed, shown by the README) when
    ZAKI_UPDATE_SCREENSHOTS=1, else a scratch folder, so a plain test run leaves the tree clean."""
    if os.environ.get("ZAKI_UPDATE_SCREENSHOTS") == "1":
        return SHOTS
    return Path(tempfile.gettempdir()) / "zaki-screenshots"


DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
JWT_SECRET = "browser-jwt-secret-" + SESSION * 4


def require_browser() -> None:
    """Playwright and Debian's Chromium; missing ones skip locally and fail under CI=true."""
    missing = []
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (apt-get install chromium; scripts/setup.sh does)")
    if missing:
        why = "dashboard browser tests need " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


class Site:
    """The platform, the dashboard, the dashboard's origin the browser opens (`origin`) and the
    proxy's own origin (`proxy`: API keys, the Control UI)."""

    def __init__(self, plat: FaultPlatform, front: Front, origin: str, dashboard: str) -> None:
        self.plat, self.front, self.origin, self.dashboard = plat, front, origin, dashboard
        self.proxy = plat.proxy_url

    @property
    def data_root(self) -> Path:
        return self.plat.data_root

    async def api(self, method: str, path: str, session: str | None = None, **kw) -> httpx.Response:
        """The dashboard API as a non-browser client (Bearer session), on the dashboard's origin."""
        headers = {"Authorization": f"Bearer {session}"} if session else {}
        async with httpx.AsyncClient(base_url=self.origin, timeout=30) as http:
            return await http.request(method, path, headers=headers, **kw)


# A real gateway on a loaded 2-core machine can answer a probe slowly: no restarts for that.
# The memory guard is off here: it read a real gateway's start-up (0 -> ~1 GiB in a minute) as
# growth toward its 2 GiB limit and restarted it every minute (seen 6 times in 7 min); not the
# dashboard's business, reported.
LENIENT_MONITOR = {
    "ZAKI_PROBE_INTERVAL_S": "3",
    "ZAKI_PROBE_TIMEOUT_S": "10",
    "ZAKI_UNHEALTHY_AFTER": "5",
    "ZAKI_MEMORY_HIGH_RATIO": "0",
}


async def start_site(root: Path, fakes, keyring_spec: str, image: str = STANDIN_IMAGE) -> Site:
    """A platform whose agents run *image*, its dashboard, and the dashboard's origin in front of it."""
    plat = FaultPlatform(root, fakes, keyring_spec)
    front_port, dash_port = free_port(), free_port()
    origin = f"http://127.0.0.1:{front_port}"
    plat.env.update(
        ZAKI_GATEWAY_IMAGE=image,
        ZAKI_ALLOWED_IMAGES=",".join({REAL_IMAGE, STANDIN_IMAGE} - {image}),
        ZAKI_READINESS_TIMEOUT_S="240",
        ZAKI_PROXY_PUBLIC_ORIGIN=plat.proxy_url,
        ZAKI_DASHBOARD_PUBLIC_ORIGIN=origin,
        ZAKI_DASHBOARD_PROXY_URL=plat.proxy_url,
        ZAKI_JWT_SECRET=JWT_SECRET,
        ZAKI_DASHBOARD_PORT=str(dash_port),
        ZAKI_DASHBOARD_SIGNUP_OPEN="true",
        **(LENIENT_MONITOR if image == REAL_IMAGE else {}),
    )
    await plat.start_all()
    p = plat.stack.start_service("services.dashboard", {**plat.env, "ZAKI_METRICS_PORT": str(free_port())})
    wait_for_port("127.0.0.1", dash_port, p.proc, "dashboard", timeout=60)
    plat.procs["services.dashboard"] = p
    dashboard = f"http://127.0.0.1:{dash_port}"
    front = Front(dashboard)
    await front.start(front_port)
    return Site(plat, front, origin, dashboard)


async def curl_first_token(origin: str, key: str, text: str) -> tuple[float, float, str]:
    """The same chat call as the page, with curl: seconds to the first content delta (wall clock,
    curl's start included), curl's own time to the first byte, and the answer's text."""
    body = json.dumps(
        {
            "model": "openclaw",
            "stream": True,
            "user": "web:curl",
            "messages": [{"role": "user", "content": text}],
        }
    )
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sN", "--max-time", "60", "-w", "\nstarttransfer=%{time_starttransfer}\n",
        f"{origin}/v1/chat/completions",
        "-H", f"Authorization: Bearer {key}", "-H", "Content-Type: application/json", "-d", body,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    first, out, starttransfer = None, "", 0.0
    assert proc.stdout is not None
    async for raw in proc.stdout:
        line = raw.decode()
        if line.startswith("starttransfer="):
            starttransfer = float(line.split("=", 1)[1])
        elif line.startswith("data: {"):
            piece = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if piece and first is None:
                first = time.perf_counter() - t0
            out += piece
    await proc.wait()
    assert first is not None, out
    return first, starttransfer, out
