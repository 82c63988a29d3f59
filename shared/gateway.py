"""Facts about the OpenClaw gateway that every service relies on."""

from __future__ import annotations

import functools
import ipaddress

GATEWAY_PORT = 18789
CONTAINER_HOME = "/home/node"
CONTAINER_STATE_DIR = f"{CONTAINER_HOME}/.openclaw"
CONTAINER_WORKSPACE = f"{CONTAINER_HOME}/workspace"
GATEWAY_UID = 1000

# Trusted-proxy auth: the gateway accepts whoever our proxy names in this header,
# only from the instance network's gateway address, and only the one user it allows.
USER_HEADER = "x-forwarded-user"
REQUIRED_HEADERS = ("x-forwarded-proto",)
GATEWAY_SCOPES = ("operator.read", "operator.write")
CONTROL_UI_BASE_PATH = "/ui"  # gateway.controlUi.basePath; the proxy serves the Control UI at the same path


# The dashboard's own RPC line asserts a second identity, granted operator.pairing as well;
# the proxy never asserts it, so a user's API keys and Control UI sessions never get pairing.
DASHBOARD_SCOPES = (*GATEWAY_SCOPES, "operator.pairing")


def gateway_identity(user_id: str) -> str:
    """The identity the proxy asserts to a user's gateway."""
    return f"{user_id}@zaki.local"


def dashboard_identity(user_id: str) -> str:
    """The identity the dashboard asserts (a user id never contains '.', so this can never
    equal another user's proxy identity)."""
    return f"dashboard.{user_id}@zaki.local"


# The gateway refuses client attribution that resolves to loopback (or to a trusted
# proxy). Local clients and the platform's own probes are reported as this
# documentation address (RFC 5737 TEST-NET-3) instead.
LOCAL_CLIENT_IP = "203.0.113.1"


@functools.lru_cache(maxsize=4096)
def attributable_ip(client_ip: str | None) -> str:
    try:
        ip = ipaddress.ip_address(client_ip or "")
    except ValueError:
        return LOCAL_CLIENT_IP
    return LOCAL_CLIENT_IP if ip.is_loopback or ip.is_unspecified or ip.is_link_local else str(ip)


def identity_headers(user_id: str, client_ip: str | None = None, proto: str = "https") -> dict[str, str]:
    """Headers the gateway requires on every request in trusted-proxy mode (probes included)."""
    return {
        USER_HEADER: gateway_identity(user_id),
        "x-forwarded-proto": proto,
        "x-forwarded-for": attributable_ip(client_ip),
    }


def container_name(user_id: str) -> str:
    return f"zaki-user-{user_id}"


def network_name(user_id: str) -> str:
    return f"zaki-net-{user_id}"


# A pre-started gateway waiting to be claimed (issue 16.5) is named like a user whose id
# starts "pool." (a user id never contains "."); at the claim its container is renamed to
# the user's and its data folder moved under the user's name.
POOL_PREFIX = "pool."


def is_pool_slot(user_id: str | None) -> bool:
    return bool(user_id) and user_id.startswith(POOL_PREFIX)


def user_of_container(name: str | None, label: str | None = None) -> str | None:
    """Whose gateway a container is. The name, not the label: a claimed pool slot keeps the
    labels it was created with (Docker labels are immutable) and takes its user's name."""
    prefix = container_name("")
    if name and name.lstrip("/").startswith(prefix):
        return name.lstrip("/")[len(prefix) :]
    return label
