"""Renders a user's native ``openclaw.json`` and lays out their data folder."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.gateway import (
    CONTAINER_STATE_DIR,
    CONTAINER_WORKSPACE,
    CONTROL_UI_BASE_PATH,
    DASHBOARD_SCOPES,
    GATEWAY_PORT,
    GATEWAY_SCOPES,
    GATEWAY_UID,
    REQUIRED_HEADERS,
    USER_HEADER,
    dashboard_identity,
    gateway_identity,
)


# Node's on-disk compile cache in the persistent state folder: every boot after the first (a
# wake, a restart) skips recompiling OpenClaw's module graph (issue 16.5). With NODE_COMPILE_CACHE
# set, openclaw.mjs respawns itself once to move the cache into a per-version subfolder and the
# launcher stays alive as the gateway's parent (~60 MB RSS, one more Node start per boot); its
# own "already respawned" marker skips that, and the cache stays where we put it.
def gateway_env() -> dict[str, str]:
    """A gateway container's base environment: where OpenClaw finds its config, state, workspace
    and caches (BOOT_ENV and the heap cap come on top)."""
    return {
        "HOME": "/home/node",
        "OPENCLAW_HOME": "/home/node",
        "OPENCLAW_STATE_DIR": CONTAINER_STATE_DIR,
        "OPENCLAW_CONFIG_PATH": f"{CONTAINER_STATE_DIR}/openclaw.json",
        "OPENCLAW_WORKSPACE_DIR": CONTAINER_WORKSPACE,
        "XDG_CACHE_HOME": f"{CONTAINER_STATE_DIR}/cache",
    }


BOOT_ENV = {
    "NODE_COMPILE_CACHE": f"{CONTAINER_STATE_DIR}/cache/node-compile",
    "OPENCLAW_PACKAGED_COMPILE_CACHE_RESPAWNED": "1",
}


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str
    api: str
    api_key: str
    models: tuple[str, ...]


@dataclass(frozen=True)
class GatewaySpec:
    user_id: str
    bot_token: str
    model: str  # "<provider>/<model id>"
    provider: Provider
    trusted_proxy_ip: str  # the instance network's gateway address, as the container sees the proxy
    password: str  # internal-only; never leaves the platform
    allowed_origins: tuple[str, ...] = ()
    telegram_api_root: str | None = None
    telegram_allow_from: tuple[str, ...] = ()
    telegram_private_network: bool = False
    extra_models: tuple[str, ...] = field(default=())
    # plugins.allow (empty: OpenClaw's default set); see ZakiSettings.gateway_plugins.
    plugins: tuple[str, ...] = ()
    dreaming: bool = True  # memory-core's nightly memory consolidation (a cron job calling the model)
    telegram_enabled: bool = True  # off while a sleeper is frozen: its bot is the waker's to poll


def _plugins(spec: GatewaySpec) -> dict[str, Any]:
    """Only the plugins a hosted gateway uses: each loaded plugin costs boot time (issue 16.5)."""
    out: dict[str, Any] = {}
    if spec.plugins:
        out["allow"] = list(spec.plugins)
    if not spec.dreaming and (not spec.plugins or "memory-core" in spec.plugins):
        out["entries"] = {"memory-core": {"config": {"dreaming": {"enabled": False}}}}
    return out


def render_openclaw_config(spec: GatewaySpec) -> dict[str, Any]:
    """The gateway's native config: trusted-proxy auth, HTTP endpoints on, Telegram, one provider."""
    identity, dashboard = gateway_identity(spec.user_id), dashboard_identity(spec.user_id)
    model_ids = list(dict.fromkeys([*spec.provider.models, spec.model.split("/", 1)[-1]]))
    telegram: dict[str, Any] = {"enabled": spec.telegram_enabled, "botToken": spec.bot_token}
    if spec.telegram_allow_from:
        telegram.update(dmPolicy="allowlist", allowFrom=list(spec.telegram_allow_from))
    else:
        telegram["dmPolicy"] = "pairing"
    if spec.telegram_api_root:
        telegram["apiRoot"] = spec.telegram_api_root
    if spec.telegram_private_network:
        telegram["network"] = {"dangerouslyAllowPrivateNetwork": True}
    config: dict[str, Any] = {
        "gateway": {
            "mode": "local",
            "port": GATEWAY_PORT,
            "bind": "lan",
            "trustedProxies": [spec.trusted_proxy_ip],
            "auth": {
                "mode": "trusted-proxy",
                "password": spec.password,
                "trustedProxy": {
                    "userHeader": USER_HEADER,
                    "requiredHeaders": list(REQUIRED_HEADERS),
                    "allowUsers": [identity, dashboard],
                },
                "identityScopes": {identity: list(GATEWAY_SCOPES), dashboard: list(DASHBOARD_SCOPES)},
            },
            # Served through the proxy under /ui (its UI_PREFIX); the proxy sets the Origin.
            "controlUi": {"allowedOrigins": list(spec.allowed_origins), "basePath": CONTROL_UI_BASE_PATH},
            # Tenants get the agent, not a root-ish shell on the container.
            "terminal": {"enabled": False},
            "http": {"endpoints": {"chatCompletions": {"enabled": True}, "responses": {"enabled": True}}},
        },
        "agents": {"defaults": {"model": {"primary": spec.model}, "workspace": CONTAINER_WORKSPACE}},
        "models": {
            "mode": "merge",
            "providers": {
                spec.provider.name: {
                    "baseUrl": spec.provider.base_url,
                    "apiKey": spec.provider.api_key,
                    "api": spec.provider.api,
                    "models": [{"id": m, "name": m} for m in model_ids],
                }
            },
        },
    }
    if spec.bot_token:  # a pool slot has none until it is claimed
        config["channels"] = {"telegram": telegram}
    if plugins := _plugins(spec):
        config["plugins"] = plugins
    return config


SOUL_MD = """# SOUL

You are a helpful, honest personal assistant. Be concise, warm and direct.
"""

MEMORY_MD = """# MEMORY

Curated long-term memory. Add what is worth remembering across conversations.
"""

SEED_FILES = {"SOUL.md": SOUL_MD, "MEMORY.md": MEMORY_MD}


@dataclass(frozen=True)
class UserDirs:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / ".openclaw"

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def config(self) -> Path:
        return self.state / "openclaw.json"


def user_dirs(data_root: Path, user_id: str) -> UserDirs:
    # user_id was validated against a strict pattern; resolve() guards the invariant anyway.
    root = (data_root / "users" / user_id).resolve()
    if root.parent != (data_root / "users").resolve():
        raise ValueError("user directory escapes the data root")
    return UserDirs(root)


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, GATEWAY_UID, GATEWAY_UID)


def prepare_user_dirs(dirs: UserDirs) -> None:
    """Creates the folders (0700, owned by the gateway's uid) and seeds absent workspace files."""
    for d in (dirs.root, dirs.state, dirs.workspace):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        _chown(d)
    for name, text in SEED_FILES.items():
        path = dirs.workspace / name
        try:
            # O_EXCL: a user's existing memory is never overwritten, even by a racing writer.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _chown(path)


def write_config_atomically(path: Path, config: dict[str, Any]) -> None:
    """Writes 0600 to a temp file, fsyncs and renames: readers see the old or the new file, never half."""
    data = json.dumps(config, indent=2).encode()
    fd, tmp = tempfile.mkstemp(prefix=".openclaw.json.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _chown(Path(tmp))
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
