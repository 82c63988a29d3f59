"""The node guard (issue 18): on every Swarm node, keeps the tenants' egress chains in place."""
