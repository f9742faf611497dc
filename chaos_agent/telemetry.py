"""Node telemetry: psutil samples for MQTT, Prometheus metrics over HTTP.

The agent publishes a `wire.Telemetry` sample every interval and serves
`/metrics` (Prometheus text format, from a registry of its own) and
`/healthz` (JSON) on the metrics listen address.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psutil
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from chaos_agent import wire

# Reverts range from a signal (microseconds) to a memory release or a
# stressor's exit (a second or more); the buckets cover both ends.
REVERT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The agent's Prometheus metrics, in a registry that is not the global one
    so that several agents (or tests) in one process never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.faults_active = Gauge(
            "aftershock_agent_faults_active",
            "Faults currently applied by this agent.",
            ["type"],
            registry=self.registry,
        )
        self.faults_applied = Counter(
            "aftershock_agent_faults_applied",
            "Faults applied and verified.",
            ["type"],
            registry=self.registry,
        )
        self.faults_reverted = Counter(
            "aftershock_agent_faults_reverted",
            "Faults reverted, by why.",
            ["type", "cause"],
            registry=self.registry,
        )
        self.faults_failed = Counter(
            "aftershock_agent_faults_failed",
            "Faults whose apply or revert failed.",
            ["type", "stage"],
            registry=self.registry,
        )
        self.commands_rejected = Counter(
            "aftershock_agent_commands_rejected",
            "Commands refused before anything changed, by kind of reason.",
            ["reason"],
            registry=self.registry,
        )
        self.commands_received = Counter(
            "aftershock_agent_commands_received",
            "Commands addressed to this agent, by action.",
            ["action"],
            registry=self.registry,
        )
        self.revert_seconds = Histogram(
            "aftershock_agent_revert_seconds",
            "Time a driver took to revert a fault.",
            ["type"],
            buckets=REVERT_BUCKETS,
            registry=self.registry,
        )
        self.broker_connected = Gauge(
            "aftershock_agent_broker_connected",
            "1 while the agent holds a session with its broker.",
            registry=self.registry,
        )
        self.halted = Gauge(
            "aftershock_agent_halted",
            "1 while a retained halt is in force.",
            registry=self.registry,
        )
        self.node_cpu_percent = Gauge(
            "aftershock_node_cpu_percent",
            "Node CPU use over the last telemetry interval, percent of all CPUs.",
            registry=self.registry,
        )
        self.node_memory_used_bytes = Gauge(
            "aftershock_node_memory_used_bytes",
            "Node memory in use (total minus available).",
            registry=self.registry,
        )
        self.node_memory_percent = Gauge(
            "aftershock_node_memory_percent",
            "Node memory in use, percent of total.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def sample(site: str, node: str, faults_active: int) -> wire.Telemetry:
    """One node sample. CPU percent covers the time since the previous call
    (psutil keeps the last reading), so call it once per interval."""
    memory = psutil.virtual_memory()
    net = psutil.net_io_counters()
    return wire.Telemetry(
        node=node,
        site=site,
        cpu_count=psutil.cpu_count() or 1,
        cpu_percent=psutil.cpu_percent(interval=None),
        load1=psutil.getloadavg()[0],
        memory_total_bytes=memory.total,
        memory_used_bytes=memory.total - memory.available,
        memory_percent=memory.percent,
        net_bytes_sent=net.bytes_sent if net else 0,
        net_bytes_recv=net.bytes_recv if net else 0,
        faults_active=faults_active,
    )


def record_sample(metrics: Metrics, telemetry: wire.Telemetry) -> None:
    metrics.node_cpu_percent.set(telemetry.cpu_percent)
    metrics.node_memory_used_bytes.set(telemetry.memory_used_bytes)
    metrics.node_memory_percent.set(telemetry.memory_percent)


# A watchdog that has not ticked for this long means the event loop is stuck
# (a blocking call somewhere): deadlines would be missed, so say unhealthy.
STALL_AFTER_S = 10.0


class MetricsServer:
    """`/metrics` and `/healthz` on one aiohttp site.

    `health` returns the agent's view (broker connected, halted, faults) and
    the monotonic time of the last watchdog tick.
    """

    def __init__(
        self,
        metrics: Metrics,
        health: Callable[[], dict[str, Any]],
        host: str,
        port: int,
    ) -> None:
        self.metrics = metrics
        self.health = health
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _healthz(self, request: web.Request) -> web.Response:
        health = self.health()
        stalled_s = time.monotonic() - float(health.pop("last_tick", time.monotonic()))
        health["watchdog_age_s"] = round(stalled_s, 3)
        healthy = stalled_s < STALL_AFTER_S
        health["ok"] = healthy
        return web.json_response(health, status=200 if healthy else 503)
