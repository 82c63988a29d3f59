"""Settings for every service, read from ``ZAKI_*`` environment variables."""

from __future__ import annotations

import uuid
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# A swarm node's name where it becomes a NATS subject token and a consumer name: a DNS label.
NODE_NAME_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"


class ZakiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZAKI_", env_file=None, extra="ignore")

    # Infrastructure
    nats_url: str = "nats://127.0.0.1:4222"  # several servers of a cluster: comma-separated
    stream_replicas: int = Field(default=1, ge=1, le=5)  # 3 on a NATS cluster
    mongo_url: str = "mongodb://127.0.0.1:27017/"
    mongo_db: str = "zaki"
    # Key ring for secrets at rest: "kid1:<base64 32 bytes>,kid2:<...>"; the first key encrypts.
    secret_keys: SecretStr = SecretStr("")

    # Labels every container and network; a provisioner only ever reconciles its own platform's.
    platform_id: str = Field(default="zaki", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    # Docker host this provisioner drives; recorded on every instance so several hosts can share one store.
    docker_host_id: str = "local"
    docker_url: str | None = None  # None: DOCKER_HOST or the local socket
    # Where gateways run (issue 18, docs/swarm.md): "docker", the engine at docker_url; "swarm",
    # one service per user on the Docker Swarm whose manager's API is swarm_manager_url.
    runtime: Literal["docker", "swarm"] = "docker"
    swarm_manager_url: str | None = None
    # Where the proxy reaches a node's published ports when not at its swarm address:
    # "hostname=address,..."; and the address gateways see the proxy come from (trustedProxies).
    swarm_node_addresses: str = Field(default="", pattern=r"^([^=,\s]+=[^=,\s]+(,[^=,\s]+=[^=,\s]+)*)?$")
    swarm_proxy_address: str | None = None
    # This replica's node (its hostname in the swarm) when one provisioner runs on each node: it
    # alone acts on the gateways pinned there and forwards the others' commands (routing.py).
    swarm_node: str | None = Field(default=None, pattern=NODE_NAME_PATTERN)
    # The image of the node guard the provisioner runs on every node (the platform's services
    # image, services/node_guard): it keeps the tenants' egress chains in each node's kernel.
    swarm_guard_image: str | None = None
    node_guard_interval_s: float = Field(default=10.0, gt=0)
    # Set by the provisioner on the guard: every node's address, blocked for tenants (swarm_guard.py).
    node_guard_peers: str = Field(default="", pattern=r"^[0-9.,]*$")
    data_root: Path = Path("/var/lib/zaki")
    gateway_image: str = "zaki/openclaw-gateway:2026.9.6"
    # Other images a request or an upgrade may name (comma-separated), e.g. a canary build.
    allowed_images: str = ""
    gateway_memory: str = "2g"
    gateway_cpus: float = 2.0
    gateway_pids_limit: int = 512
    port_range_start: int = 19100
    port_range_end: int = 19999
    # Per-instance networks are carved from this pool, one /network_prefix per port of the range.
    network_pool: str = "10.250.0.0/16"
    network_prefix: int = 29
    # The address published gateway ports bind to, and that the proxy and monitor dial.
    gateway_publish_ip: str = "127.0.0.1"
    readiness_timeout_s: float = 120.0
    # Pre-started gateways kept ready for new users (services/provisioner/pool.py): a new user's
    # gateway is one of them, claimed by a config hot reload instead of a cold boot. Each costs a
    # running gateway's memory (0.7-1 GiB real) all the time; 0: none.
    pool_size: int = Field(default=0, ge=0, le=64)
    # A claim's refill waits this long: a slot's boot (~13 CPU-s) would slow the new user's first turns.
    pool_refill_delay_s: float = Field(default=20.0, ge=0)
    # How a suspended gateway sleeps (issue 16): "stop" (the container stops; a wake is a full
    # boot) or "swap" (frozen and pushed to the host's swap down to suspend_swap_floor; a wake
    # thaws it in a few seconds). "swap" needs swap space on the Docker host, about a running
    # gateway's memory per sleeper; a sleeper that cannot be pushed out is stopped instead.
    suspend_mode: Literal["stop", "swap"] = "stop"
    suspend_swap_floor: str = "64m"
    stop_timeout_s: int = 20
    reconcile_interval_s: float = 60.0
    # Self-healing (services/provisioner/reconcile.py): an instance that was running and failed on
    # the platform's own initiative is retried after base * 2^n s (at most max), heal_max_attempts
    # times; then it is `crashlooping` and left alone. A failure heal_reset_s after the previous
    # one starts a fresh count.
    heal_backoff_base_s: float = Field(default=30.0, gt=0)
    heal_backoff_max_s: float = Field(default=900.0, gt=0)
    heal_max_attempts: int = Field(default=5, ge=0)
    heal_reset_s: float = Field(default=3600.0, gt=0)
    # V8's heap cap as a share of the gateway's memory limit (the seed: 1024 MiB of 2 GiB); 0: none.
    gateway_heap_ratio: float = Field(default=0.5, ge=0, lt=1)
    # Boot time (issue 16.5, bench/boot.py): the OpenClaw plugins a hosted gateway loads
    # (plugins.allow, comma-separated; empty: OpenClaw's default 15, among them browser, canvas,
    # computer use and four model providers the platform never uses), and memory-core's nightly
    # "dreaming" (a cron job that calls the model and would wake a suspended gateway every night).
    gateway_plugins: str = Field(
        default="telegram,memory-core",
        pattern=r"^\s*([a-z0-9][a-z0-9._-]*\s*(,\s*[a-z0-9][a-z0-9._-]*\s*)*)?$",
    )
    gateway_dreaming: bool = False
    # Per-tenant data folder limits (0: none), measured by every reconcile; over them the
    # instance is stopped (reason disk_quota_exceeded) and a start is refused. The walk stops
    # at the limit, so max_files also bounds its cost (~2.3 us an entry).
    tenant_disk_bytes: int = Field(default=10 << 30, ge=0)
    tenant_max_files: int = Field(default=1_000_000, ge=0)

    # Telegram Bot API root (no /bot<token> suffix); tests point it at a local fake.
    telegram_api_base: str = "https://api.telegram.org"
    telegram_timeout_s: float = 10.0
    # The Bot API root as the gateways see it from inside their containers (default: the same).
    telegram_api_base_for_gateways: str = ""
    # Lets gateways reach a Bot API at a private address (a local fake): tests and demos only.
    telegram_private_network: bool = False

    # The platform's default model provider, as the LLM broker reaches it. Seeds the
    # provider "<llm_provider_name>" on the broker's first start when an api key is given;
    # afterwards `zaki providers` owns it. Gateways never see this URL or key.
    llm_provider_name: str = "zaki"
    llm_base_url: str = "http://127.0.0.1:8000/v1"
    llm_api: str = "openai-completions"
    llm_api_key: SecretStr = SecretStr("")
    llm_models: str = ""  # comma-separated model ids the default provider offers (besides the default)
    default_model: str = "zaki/default"

    # LLM broker: every model call of every gateway goes through it.
    # It listens where gateway containers can reach it (the Docker bridge address) and nowhere else.
    broker_host: str = "172.17.0.1"
    broker_port: int = 8090
    # The broker's address as gateways see it from inside their containers.
    broker_url_for_gateways: str = "http://host.docker.internal:8090"
    # Refuse a broker credential that arrives from outside its own instance's network.
    broker_check_source: bool = True
    broker_timeout_s: float = 600.0  # a long generation may stream for minutes
    # Where provider URLs may point (shared/provider_url.py). Comma-separated.
    # Domain suffixes a provider host must match ("api.openai.com,anthropic.com"); empty: any public host.
    broker_allowed_hosts: str = ""
    # host[:port] entries (names, addresses or networks) that may be called over plain http.
    broker_http_hosts: str = ""
    # host[:port] entries that may be, or resolve to, a loopback/private/link-local/platform
    # address (an operator's own model server, the local fakes). Default: none.
    broker_private_hosts: str = ""
    # Tokens reserved for a call's answer when the request sets no max_tokens (budget reservations).
    broker_reserve_tokens: int = Field(default=4096, ge=0)
    # Ask OpenAI-style providers for usage on streams (stream_options.include_usage).
    broker_request_stream_usage: bool = True
    # Where budget reservations live: "store" (shared by every broker process; a few store
    # round trips per call with a token limit) or "process" (memory: exactly one broker process).
    broker_reservations: str = Field(default="store", pattern=r"^(store|process)$")
    # Platform default budgets per user (0: unlimited); an instance's own budget overrides them.
    budget_requests_per_minute: int = 60
    budget_tokens_per_day: int = 0
    budget_tokens_per_month: int = 0
    budget_soft_ratio: float = Field(default=0.8, gt=0, le=1)

    # Metrics
    metrics_port: int = 0  # 0: no metrics listener
    # Loopback by default: a tenant container reaches every host port bound to all interfaces.
    metrics_host: str = "127.0.0.1"

    # Tenant egress (services/provisioner/egress.py): iptables rules per tenant network, so a
    # container reaches DNS, the public internet and the broker only. "off" is unsafe.
    egress_policy: str = Field(default="enforce", pattern=r"^(enforce|off)$")
    # Extra destinations tenants may reach, comma-separated: "CIDR", "CIDR:PORT" (tcp) or "CIDR:udp/PORT".
    egress_allow: str = ""
    # Resolvers tenants may query on port 53 (comma-separated); empty: the host's resolv.conf.
    egress_dns: str = ""

    # Gateway proxy
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8080
    # Browser origins the gateways' Control UI accepts (comma-separated): where the proxy is served.
    proxy_public_origin: str = "http://127.0.0.1:8080"
    jwt_secret: SecretStr = SecretStr("")
    jwt_public_key: str = ""
    jwt_audience: str = "zaki"
    rate_limit_rps: float = 20.0
    rate_limit_burst: int = 40
    max_body_bytes: int = 20 * 1024 * 1024
    max_websockets_per_tenant: int = 8
    proxy_idle_timeout_s: float = 300.0  # no byte from the gateway for this long ends a stream
    proxy_workers: int = 1  # processes sharing the port (SO_REUSEPORT)
    proxy_drain_s: float = 30.0
    proxy_keepalive_s: float = 75.0  # an idle client connection is closed after this long
    proxy_header_timeout_s: float = 30.0  # a request must arrive whole (headers and body) within this
    # Serve the API routes on the raw llhttp data plane (services/gateway_proxy/http_plane.py);
    # false: everything through aiohttp (the same rules, slower; see bench/proxy.py).
    proxy_fastpath: bool = True

    # Dashboard (services/dashboard): accounts, sessions and the JSON API behind the web pages.
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8095
    dashboard_signup_open: bool = True
    dashboard_session_idle_s: float = Field(default=7 * 86400, gt=0)  # a session unused this long ends
    dashboard_session_max_s: float = Field(default=30 * 86400, gt=0)  # and every session ends after this
    dashboard_jwt_ttl_s: float = Field(default=900, ge=60)  # the proxy cookie's JWT; renewed by the pages
    # PEM private key (Ed25519, RSA or EC) matching jwt_public_key; empty: HS256 with jwt_secret.
    dashboard_jwt_private_key: SecretStr = SecretStr("")
    dashboard_models: str = ""  # models a user may pick (comma-separated); empty: the default + llm_models
    dashboard_file_max_bytes: int = Field(default=64 * 1024, ge=1024)  # SOUL.md / MEMORY.md
    # A user's import (POST /api/agent/import): the uploaded tar.gz, what it may unpack to (also never
    # over tenant_disk_bytes) and how many entries it may hold (a decompression bomb stops there).
    dashboard_import_max_bytes: int = Field(default=64 << 20, ge=1024)
    dashboard_import_max_unpacked_bytes: int = Field(default=1 << 30, ge=1024)
    dashboard_import_max_entries: int = Field(default=100_000, ge=1)
    dashboard_user_prefix: str = Field(
        default="u", pattern=r"^[a-z][a-z0-9]{0,20}$"
    )  # new accounts' user ids
    # Failed log-ins: a burst, then one more per interval; per account and per client address.
    dashboard_login_account_burst: int = Field(default=5, ge=1)
    dashboard_login_account_interval_s: float = Field(default=30.0, gt=0)
    dashboard_login_address_burst: int = Field(default=20, ge=1)
    dashboard_login_address_interval_s: float = Field(default=10.0, gt=0)
    # Peers whose X-Forwarded-For is believed (the proxy on the same host): the client address.
    dashboard_trusted_proxies: str = "127.0.0.1,::1"
    # The gateway image agents created from the dashboard ask for (one of images()); empty: the default.
    dashboard_gateway_image: str = ""
    # The dashboard's own public origin(s), comma-separated: where its pages and API are served. Never
    # the proxy's (tenants control content there: security review H4). Its cross-site rule accepts only
    # these. Empty: http://127.0.0.1:<dashboard_port>.
    dashboard_public_origin: str = ""
    # Where the dashboard reaches the gateway proxy for the pages' chat (server to server); empty:
    # http://127.0.0.1:<proxy_port>.
    dashboard_proxy_url: str = ""
    # Domain attribute of the proxy's cookie (zaki_session) when the dashboard and the proxy have
    # different host names (e.g. ".zaki.example"); empty: host-only (same host name, any port).
    dashboard_cookie_domain: str = ""

    # Monitor
    probe_interval_s: float = 4.0
    probe_timeout_s: float = 2.0
    probe_concurrency: int = 200
    unhealthy_after: int = 2
    healthy_after: int = 2
    restart_backoff_base_s: float = 2.0
    restart_backoff_max_s: float = 300.0
    crashloop_restarts: int = 5
    crashloop_window_s: float = 600.0
    summary_interval_s: float = 30.0
    probe_spread: float = 0.8  # share of the interval over which one sweep's probes are spread
    slow_probe_s: float = 1.0  # a readiness answer slower than this counts as degraded
    swarm_task_poll_s: float = Field(default=2.0, gt=0)  # the monitor reads the swarm's tasks (tasks.py)
    die_grace_s: float = 3.0  # after a container dies, how long Docker's own restart policy gets
    health_write_interval_s: float = 30.0  # how often a healthy instance's last probe is persisted
    # Restart before memory runs out (issue 17.3; services/monitor/memory.py). An instance above
    # memory_high_ratio of its limit for memory_high_for_s, or projected (least-squares slope over
    # memory_window_s) to reach its limit within memory_horizon_s, is restarted (memory_growth) once
    # quiet: no proxy or broker activity for memory_quiet_s (an open WebSocket, stream or request in
    # flight counts as activity at every flush). Within memory_force_s of the limit it is restarted
    # even if busy: the kernel would kill it mid-answer anyway. 0 ratio: off.
    memory_high_ratio: float = Field(default=0.9, ge=0, le=1)
    memory_high_for_s: float = Field(default=300.0, ge=0)
    memory_horizon_s: float = Field(default=1800.0, ge=0)
    memory_window_s: float = Field(default=600.0, gt=0)
    memory_warmup_s: float = Field(default=300.0, ge=0)  # an incarnation's boot is not sampled
    # Above the longest single model call usually seen: the broker marks a call's start only.
    memory_quiet_s: float = Field(default=60.0, ge=0)
    memory_force_s: float = Field(default=60.0, ge=0)
    memory_sample_s: float = Field(default=10.0, gt=0)  # how often each gateway's memory is read
    memory_cgroup_root: str = "/sys/fs/cgroup/memory/docker"  # cgroup v1; v2 and Docker stats as fallback
    # Fleet rollouts (issue 17.2): a runner whose heartbeat is older than this is gone; resume takes over.
    fleet_lease_s: float = Field(default=30.0, gt=0)
    # The wave gate's error rates (services/fleet/plan.py gate): over the soak, across the upgraded
    # instances, proxy answers that are 5xx and broker model calls that failed upstream
    # (shared/activity.py is_error); judged only from fleet_min_samples answers on, so that one error
    # on two requests does not halt a wave. A limit of 1: off.
    fleet_max_proxy_5xx_rate: float = Field(default=0.05, ge=0, le=1)
    fleet_max_broker_error_rate: float = Field(default=0.05, ge=0, le=1)
    fleet_min_samples: int = Field(default=50, ge=1)
    # Audit trail (issue 17.4): the ZAKI_AUDIT stream keeps records this long.
    audit_retention_days: float = Field(default=400.0, gt=0)

    # Idle suspend and wake (issue 16; services/waker, shared/activity.py).
    # 0: never; per instance: idle_suspend_s. Below OpenClaw's 30-min heartbeat (a model call when
    # the owner has a route), or a gateway with one never reaches its idle time.
    idle_suspend_s: float = Field(default=900.0, ge=0)
    wake_timeout_s: float = 60.0  # a request held for a waking gateway gets 503 + Retry-After after this
    wake_queue_per_tenant: int = 64  # requests held per waking tenant; more get 503 at once
    activity_flush_s: float = 5.0  # how often proxies and brokers write last-seen activity
    waker_poll_timeout_s: int = Field(default=25, ge=0, le=50)  # Telegram long-poll timeout
    waker_concurrency: int = 500  # long polls in flight at once
    waker_sweep_s: float = 10.0  # idle sweep and resync with the store
    wake_lead_s: float = 60.0  # wake this long before a gateway's next scheduled job
    wake_for_heartbeat: bool = False  # also wake a sleeper for OpenClaw's recurring heartbeat job
    waker_release_timeout_s: float = 3.0  # the provisioner waits this long for the waker to stop polling

    # Backups (issue 17; services/backup). Target "local": backup_dir (default <data_root>/backups);
    # "s3": any S3-compatible store. Interval 0: no scheduled backups (per instance: backup_interval_s).
    backup_target: str = Field(default="local", pattern=r"^(local|s3)$")
    backup_dir: Path | None = None
    backup_s3_endpoint: str = ""  # empty: AWS
    backup_s3_bucket: str = ""
    backup_s3_prefix: str = "zaki-backups"
    backup_s3_region: str = "us-east-1"
    backup_s3_access_key: SecretStr = SecretStr("")
    backup_s3_secret_key: SecretStr = SecretStr("")
    backup_interval_s: float = Field(default=86400.0, ge=0)
    backup_keep_count: int = Field(default=7, ge=1)  # newest good backups kept per user
    backup_keep_days: float = Field(default=30.0, gt=0)  # older ones go (the newest one always stays)
    backup_timeout_s: float = Field(default=1800.0, gt=0)
    backup_sweep_s: float = Field(default=60.0, gt=0)  # the backup service's scheduling sweep
    # Before an upgrade or a delete: "required" (the command fails when the backup does), "best_effort", "off".
    backup_before_change: str = Field(default="required", pattern=r"^(required|best_effort|off)$")
    delete_grace_days: float = Field(default=30.0, ge=0)  # a deleted user's backups are kept this long

    replica_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])

    @field_validator("gateway_memory", "suspend_swap_floor")
    @classmethod
    def _docker_size(cls, v: str) -> str:
        """A size Docker reads (2g, 1536m, 512k, bytes): a typo fails at start, not at a user's
        first provisioning or suspend."""
        from docker.utils import parse_bytes  # the parser both runtimes use

        try:
            if parse_bytes(v.strip()) <= 0:
                raise ValueError
        except Exception:
            raise ValueError(f"not a Docker memory size (like 2g or 1536m): {v!r}") from None
        return v.strip()

    @model_validator(mode="after")
    def _swarm_runtime_is_complete(self) -> ZakiSettings:
        """A Swarm runtime needs its manager; swap suspend and the pool need one engine's
        pause/update/network-connect on the gateway's own container, which a Swarm service
        replaces instead (services/provisioner/swarm_runtime.py)."""
        if self.runtime == "swarm":
            if not self.swarm_manager_url:
                raise ValueError("ZAKI_RUNTIME=swarm needs ZAKI_SWARM_MANAGER_URL")
            if self.suspend_mode != "stop" or self.pool_size:
                raise ValueError("ZAKI_RUNTIME=swarm supports ZAKI_SUSPEND_MODE=stop and no pool")
            if self.egress_policy != "off" and not self.swarm_guard_image:
                raise ValueError(
                    "ZAKI_RUNTIME=swarm fences tenants in with a node guard on every node: set "
                    "ZAKI_SWARM_GUARD_IMAGE to the platform's services image (docs/swarm.md)"
                )
            if self.swarm_node and self.backup_target == "local" and self.backup_dir is None:
                raise ValueError(  # a move carries the folder as a backup (services/provisioner/moves.py)
                    "ZAKI_SWARM_NODE keeps data folders on each node's disk: backups must be where every "
                    "node reaches them (ZAKI_BACKUP_TARGET=s3, or ZAKI_BACKUP_DIR on a shared mount)"
                )
        elif self.swarm_node:
            raise ValueError(
                "ZAKI_SWARM_NODE routes commands between a swarm's nodes: it needs ZAKI_RUNTIME=swarm"
            )
        return self

    def swarm_nodes(self) -> dict[str, str]:
        return dict(pair.split("=", 1) for pair in self.swarm_node_addresses.split(",") if pair)

    def images(self) -> list[str]:
        return [self.gateway_image, *(i.strip() for i in self.allowed_images.split(",") if i.strip())]

    def gateway_plugin_ids(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.gateway_plugins.split(",") if p.strip())

    def proxy_public_origins(self) -> list[str]:
        return [o.strip() for o in self.proxy_public_origin.split(",") if o.strip()]

    def dashboard_public_origins(self) -> list[str]:
        listed = [o.strip() for o in self.dashboard_public_origin.split(",") if o.strip()]
        return listed or [f"http://127.0.0.1:{self.dashboard_port}"]

    def dashboard_proxy_base(self) -> str:
        return (self.dashboard_proxy_url or f"http://127.0.0.1:{self.proxy_port}").rstrip("/")


@lru_cache
def get_settings() -> ZakiSettings:
    return ZakiSettings()
