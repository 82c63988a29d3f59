"""Grafana dashboards as code (Grafana's grafana-foundation-sdk).

    python deploy/grafana/dashboards.py           # writes deploy/grafana/dashboards/*.json
    python deploy/grafana/dashboards.py --check   # exits 1 when the committed JSON is stale

Every panel query is listed by ``panel_queries()`` so a test can run each one against a
real Prometheus scraping the services.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders.dashboard import Dashboard, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from shared.generated import write_or_check

OUT = Path(__file__).resolve().parent / "dashboards"

# Panels a test also checks for a non-zero value once a gateway is suspended.
SUSPENDED = "Suspended (idle, memory freed)"
SUSPENDED_SHARE = "Suspended share of running + suspended"

# (row, kind, title, unit, [(expr, legend)])
FLEET = [
    (
        "Instances",
        "stat",
        "Running instances",
        "short",
        [('sum(zaki_instances{state="running"})', "running")],
    ),
    ("Instances", "stat", "Unhealthy or unreachable", "short", [("zaki:instances_unhealthy:count", "down")]),
    # Idle suspend (issue 16): neither up nor down, counted apart (deploy/prometheus/rules.yml).
    ("Instances", "stat", SUSPENDED, "short", [("zaki:instances_suspended:count", "suspended")]),
    ("Instances", "stat", SUSPENDED_SHARE, "percentunit", [("zaki:instances_suspended:ratio", "suspended")]),
    ("Instances", "ts", "Instances by state", "short", [("sum by (state) (zaki_instances)", "{{state}}")]),
    (
        "Instances",
        "ts",
        "Health by state",
        "short",
        [("sum by (state) (zaki_monitor_instances)", "{{state}}")],
    ),
    # Pre-started gateways for new users (ZAKI_POOL_SIZE, services/provisioner/pool.py).
    ("Provisioning", "stat", "Pool slots ready", "short", [("sum(zaki_pool_slots_ready)", "ready")]),
    (
        "Provisioning",
        "ts",
        "New users: pool claims and cold-start fallbacks",
        "short",
        [("sum by (outcome) (increase(zaki_pool_claims_total[$__rate_interval]))", "{{outcome}}")],
    ),
    (
        "Provisioning",
        "ts",
        "Requests by outcome",
        "reqps",
        [("sum by (outcome) (rate(zaki_provisioner_requests_total[$__rate_interval]))", "{{outcome}}")],
    ),
    (
        "Provisioning",
        "ts",
        "Time to ready (p50, p90)",
        "s",
        [
            (
                'histogram_quantile(0.5, sum by (le) (rate(zaki_provisioner_phase_seconds_bucket{phase="ready"}[$__rate_interval])))',
                "p50",
            ),
            (
                'histogram_quantile(0.9, sum by (le) (rate(zaki_provisioner_phase_seconds_bucket{phase="ready"}[$__rate_interval])))',
                "p90",
            ),
        ],
    ),
    (
        "Provisioning",
        "ts",
        "Phase duration (mean)",
        "s",
        [
            (
                "sum by (phase) (rate(zaki_provisioner_phase_seconds_sum[$__rate_interval])) / "
                "sum by (phase) (rate(zaki_provisioner_phase_seconds_count[$__rate_interval]))",
                "{{phase}}",
            )
        ],
    ),
    (
        "Restarts",
        "ts",
        "Restarts requested by reason",
        "short",
        [
            (
                "sum by (reason) (increase(zaki_monitor_restarts_requested_total[$__rate_interval]))",
                "{{reason}}",
            )
        ],
    ),
    (
        "Restarts",
        "ts",
        "Probe failures by reason",
        "short",
        [("sum by (reason) (increase(zaki_monitor_probe_failures_total[$__rate_interval]))", "{{reason}}")],
    ),
    (
        "Restarts",
        "ts",
        "Reconcile actions",
        "short",
        [
            (
                "sum by (action) (increase(zaki_provisioner_reconcile_actions_total[$__rate_interval]))",
                "{{action}}",
            )
        ],
    ),
]

PROXY = [
    (
        "Traffic",
        "ts",
        "Requests by route",
        "reqps",
        [("sum by (route) (rate(zaki_proxy_requests_total[$__rate_interval]))", "{{route}}")],
    ),
    (
        "Traffic",
        "ts",
        "Responses by status class",
        "reqps",
        [("sum by (status_class) (rate(zaki_proxy_requests_total[$__rate_interval]))", "{{status_class}}")],
    ),
    (
        "Traffic",
        "ts",
        "Bytes relayed",
        "Bps",
        [("sum by (direction) (rate(zaki_proxy_bytes_total[$__rate_interval]))", "{{direction}}")],
    ),
    (
        "Latency",
        "ts",
        "Latency to response headers (p50, p99)",
        "s",
        [
            (
                "histogram_quantile(0.5, sum by (le) (rate(zaki_proxy_request_seconds_bucket[$__rate_interval])))",
                "p50",
            ),
            (
                "histogram_quantile(0.99, sum by (le) (rate(zaki_proxy_request_seconds_bucket[$__rate_interval])))",
                "p99",
            ),
        ],
    ),
    (
        "Latency",
        "ts",
        "Upstream (gateway) latency p99",
        "s",
        [
            (
                "histogram_quantile(0.99, sum by (le, route) (rate(zaki_proxy_upstream_seconds_bucket[$__rate_interval])))",
                "{{route}}",
            )
        ],
    ),
    (
        "Errors",
        "ts",
        "Refused by reason",
        "short",
        [("sum by (reason) (increase(zaki_proxy_rejected_total[$__rate_interval]))", "{{reason}}")],
    ),
    ("Errors", "stat", "5xx ratio (5m)", "percentunit", [("zaki:proxy_5xx:ratio5m", "5xx")]),
    ("WebSockets", "ts", "Open WebSockets", "short", [("sum(zaki_proxy_open_websockets)", "open")]),
    (
        "Wake",
        "ts",
        "Requests held for a waking gateway, by outcome",
        "short",
        [("sum by (outcome) (increase(zaki_proxy_hold_total[$__rate_interval]))", "{{outcome}}")],
    ),
]

INFRA = [
    ("Services", "ts", "Targets up", "short", [("sum by (job) (up)", "{{job}}")]),
    (
        "Services",
        "ts",
        "Resident memory",
        "bytes",
        [("sum by (job) (process_resident_memory_bytes)", "{{job}}")],
    ),
    (
        "Services",
        "ts",
        "CPU",
        "percentunit",
        [("sum by (job) (rate(process_cpu_seconds_total[$__rate_interval]))", "{{job}}")],
    ),
    (
        "NATS JetStream",
        "ts",
        "Commands waiting per consumer",
        "short",
        [("max by (consumer) (zaki_jetstream_consumer_pending)", "{{consumer}}")],
    ),
    (
        "NATS JetStream",
        "ts",
        "Redelivered, unacked",
        "short",
        [("max by (consumer) (zaki_jetstream_consumer_redelivered)", "{{consumer}}")],
    ),
    (
        "NATS JetStream",
        "ts",
        "Messages handled by subject",
        "short",
        [
            (
                "sum by (destination) (rate(faststream_received_processed_messages_total[$__rate_interval]))",
                "{{destination}}",
            )
        ],
    ),
    (
        "Docker host capacity",
        "ts",
        "Gateway ports used / available",
        "short",
        [("sum(zaki_docker_host_ports_used)", "used"), ("sum(zaki_docker_host_ports)", "available")],
    ),
    (
        "Docker host capacity",
        "ts",
        "Gateway memory limits vs host memory",
        "bytes",
        [
            ("sum(zaki_docker_host_memory_reserved_bytes)", "reserved by limits"),
            ("sum(zaki_docker_host_memory_bytes)", "host memory"),
        ],
    ),
    (
        "Docker host capacity",
        "ts",
        "Memory reserved per node (share of the node)",
        "percentunit",
        # Every provisioner replica reports the nodes it sees: max, not sum, per node.
        [
            (
                "max by (node) (zaki_node_memory_reserved_bytes) / max by (node) (zaki_node_memory_bytes)",
                "{{node}}",
            )
        ],
    ),
    (
        "Docker host capacity",
        "ts",
        "Gateways per node",
        "short",
        [("max by (node) (zaki_node_gateways)", "{{node}}")],
    ),
    ("MongoDB", "ts", "Store ping round trip", "s", [("max(zaki_store_ping_seconds)", "ping")]),
    (
        "Monitor",
        "ts",
        "Sweep duration p90",
        "s",
        [
            (
                "histogram_quantile(0.9, sum by (le) (rate(zaki_monitor_sweep_seconds_bucket[$__rate_interval])))",
                "p90",
            )
        ],
    ),
    (
        "Monitor",
        "ts",
        "Probe latency p99",
        "s",
        [
            (
                "histogram_quantile(0.99, sum by (le) (rate(zaki_monitor_probe_seconds_bucket[$__rate_interval])))",
                "p99",
            )
        ],
    ),
    (
        "Monitor",
        "stat",
        "Seconds since last sweep",
        "s",
        [("time() - max(zaki_monitor_last_sweep_timestamp_seconds)", "age")],
    ),
]

BROKER = [
    (
        "Model calls",
        "ts",
        "Calls by provider and status",
        "reqps",
        [
            (
                "sum by (provider, status_class) (rate(zaki_broker_requests_total[$__rate_interval]))",
                "{{provider}} {{status_class}}",
            )
        ],
    ),
    (
        "Model calls",
        "ts",
        "Tokens per second",
        "short",
        [("sum by (kind) (rate(zaki_broker_tokens_total[$__rate_interval]))", "{{kind}}")],
    ),
    (
        "Budgets and refusals",
        "ts",
        "Refused calls by reason",
        "reqps",
        [("sum by (reason) (rate(zaki_broker_refused_total[$__rate_interval]))", "{{reason}}")],
    ),
    (
        "Latency",
        "ts",
        "Provider time to headers p90",
        "s",
        [
            (
                "histogram_quantile(0.9, sum by (le, provider) (rate(zaki_broker_upstream_seconds_bucket[$__rate_interval])))",
                "{{provider}}",
            )
        ],
    ),
    (
        "Latency",
        "ts",
        "Broker overhead p99 (auth, budget, key)",
        "s",
        [
            (
                "histogram_quantile(0.99, sum by (le) (rate(zaki_broker_overhead_seconds_bucket[$__rate_interval])))",
                "p99",
            )
        ],
    ),
]

DASHBOARDS = {
    "zaki-fleet": ("Zaki / Fleet", FLEET),
    "zaki-proxy": ("Zaki / Gateway proxy", PROXY),
    "zaki-infrastructure": ("Zaki / Infrastructure", INFRA),
    "zaki-llm-broker": ("Zaki / LLM broker", BROKER),
}


def build(uid: str, title: str, panels) -> Dashboard:
    d = Dashboard(title).uid(uid).tags(["zaki", "generated"]).refresh("30s").time("now-6h", "now")
    current_row = None
    for row, kind, panel_title, unit, queries in panels:
        if row != current_row:
            d = d.with_row(Row(row))
            current_row = row
        panel = (Stat() if kind == "stat" else Timeseries()).title(panel_title).unit(unit)
        panel = panel.height(6).span(6 if kind == "stat" else 12)
        for i, (expr, legend) in enumerate(queries):
            panel = panel.with_target(Dataquery().expr(expr).legend_format(legend).ref_id(chr(65 + i)))
        d = d.with_panel(panel)
    return d


def render() -> dict[str, str]:
    return {
        f"{uid}.json": json.dumps(
            json.loads(JSONEncoder(sort_keys=True, indent=2).encode(build(uid, title, p).build())),
            indent=2,
            sort_keys=True,
        )
        + "\n"
        for uid, (title, p) in DASHBOARDS.items()
    }


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) for every query of every panel."""
    return [
        (uid, panel_title, expr)
        for uid, (_, panels) in DASHBOARDS.items()
        for _, _, panel_title, _, queries in panels
        for expr, _ in queries
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    return write_or_check(render(), OUT, ap.parse_args().check, "python deploy/grafana/dashboards.py")


if __name__ == "__main__":
    sys.exit(main())
