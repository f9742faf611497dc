"""Prometheus metrics of one replica, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Buckets tight around the 120 ms p99 target of the rating API.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.12, 0.25,
    0.5, 1.0, 2.5,
)  # fmt: skip


class ReplicaMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "bucket_latency_seconds",
            "Time to handle a rating API request (take or bucket view).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "bucket_requests",
            "Take requests by result: allowed, limited or error.",
            ["result"],
            registry=self.registry,
        )
        self.errors = Counter(
            "bucket_errors",
            "Errors: failed requests, corrupt rows read, corrupt counters gossiped.",
            registry=self.registry,
        )
        self.corrupt_rows = Gauge(
            "bucket_corrupt_rows",
            "Rows of the local state file whose counter is not a valid count.",
            registry=self.registry,
        )
        self.drift = Gauge(
            "bucket_state_drift",
            "Max over sampled keys of |mine - peer| available tokens / capacity, "
            "over the peers of the last gossip round.",
            registry=self.registry,
        )
        self.gossip_rounds = Counter(
            "bucket_gossip_rounds", "Gossip rounds run.", registry=self.registry
        )
        self.gossip_failures = Counter(
            "bucket_gossip_failures",
            "Pulls from a peer that failed (unreachable, timeout, bad answer).",
            registry=self.registry,
        )
        self.gossip_bytes = Counter(
            "bucket_gossip_bytes",
            "Bytes of state pulled from peers.",
            registry=self.registry,
        )
        for result in ("allowed", "limited", "error"):
            self.requests.labels(result=result)
