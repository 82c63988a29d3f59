"""The provisioner's Prometheus metrics."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("zaki_provisioner_requests_total", "instance.requested outcomes", ["outcome", "reason"])
COMMANDS = Counter("zaki_provisioner_commands_total", "Lifecycle commands handled", ["command", "outcome"])
PHASE_SECONDS = Histogram(
    "zaki_provisioner_phase_seconds",
    "Provisioning duration by phase",
    ["phase"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120),
)
RECONCILE_ACTIONS = Counter("zaki_provisioner_reconcile_actions_total", "Reconcile actions", ["action"])
DEAD_LETTERS = Counter(
    "zaki_dead_letters_total", "Malformed events sent to the dead-letter subject", ["subject"]
)
INSTANCES = Gauge("zaki_instances", "Instances on this provisioner's Docker host, by state", ["state"])

PORTS_CAPACITY = Gauge("zaki_docker_host_ports", "Gateway ports this Docker host can hand out")
PORTS_USED = Gauge("zaki_docker_host_ports_used", "Gateway ports claimed on this Docker host")
HOST_MEMORY = Gauge("zaki_docker_host_memory_bytes", "Memory of this Docker host")
MEMORY_RESERVED = Gauge(
    "zaki_docker_host_memory_reserved_bytes", "Sum of the memory limits of this host's gateways"
)
# Per node (one engine: one node; a Swarm: each of the manager's nodes), set by reconcile.
NODE_MEMORY = Gauge("zaki_node_memory_bytes", "Memory of each node gateways run on", ["node"])
NODE_RESERVED = Gauge(
    "zaki_node_memory_reserved_bytes", "Memory the platform's gateways reserve on each node", ["node"]
)
NODE_GATEWAYS = Gauge("zaki_node_gateways", "The platform's gateways placed on each node", ["node"])
NODE_READY = Gauge("zaki_node_ready", "1 when the node takes new gateways (ready and active)", ["node"])
NODE_GAUGES = (NODE_MEMORY, NODE_RESERVED, NODE_GATEWAYS, NODE_READY)
FORWARDED = Counter(
    "zaki_provisioner_forwarded_total", "Commands forwarded to the replica of the user's node", ["node"]
)
STORE_PING = Gauge("zaki_store_ping_seconds", "Round trip of a ping to MongoDB")
DISK_SCAN_SECONDS = Gauge(
    "zaki_provisioner_disk_scan_seconds", "Wall time of the last walk of the tenants' data folders"
)

# Series exist from the start (zero), so dashboards and alerts see them before the first event.
for _phase in ("config", "create", "start", "ready"):
    PHASE_SECONDS.labels(_phase)
REQUESTS.labels("ready", "")
RECONCILE_ACTION_NAMES = (
    "removed_orphan",
    "recreated",
    "abandoned",
    "healed",
    "crashlooping",
    "over_quota",
    "network_replaced",
    "sleeper_stopped",
)
for _action in RECONCILE_ACTION_NAMES:
    RECONCILE_ACTIONS.labels(_action)
CONSUMER_PENDING = Gauge("zaki_jetstream_consumer_pending", "Commands not yet delivered", ["consumer"])
CONSUMER_REDELIVERED = Gauge(
    "zaki_jetstream_consumer_redelivered", "Commands delivered more than once and not yet acked", ["consumer"]
)
POOL_READY = Gauge("zaki_pool_slots_ready", "Pre-started gateways ready to be claimed (ZAKI_POOL_SIZE)")
POOL_CLAIMS = Counter(
    "zaki_pool_claims_total",
    "New users served from the pool: claimed, or fallback to a cold start",
    ["outcome"],
)
for _outcome in ("claimed", "fallback"):  # both series from the start: dashboards show 0, not "no data"
    POOL_CLAIMS.labels(_outcome)
SUSPENDS = Counter(
    "zaki_suspends_total", "Gateways suspended, by how they sleep (ZAKI_SUSPEND_MODE)", ["sleep"]
)
for _sleep in ("stop", "swap"):
    SUSPENDS.labels(_sleep)
