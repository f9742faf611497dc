"""Node telemetry: psutil samples for MQTT, Prometheus metrics over HTTP.

The agent publishes a `wire.Telemetry` sample every interval and serves
`/metrics` (Prometheus text format, from a registry of its own) and
`/healthz` (JSON) on the metrics listen address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import psutil
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


# A scrape or probe is one small GET; a client that sends more, or takes
# longer, is cut off so it cannot hold the agent's memory or sockets.
MAX_REQUEST_BYTES = 8 * 1024
REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class MetricsServer:
    """`/metrics` and `/healthz` over a minimal HTTP/1.1 server (asyncio
    streams, one request per connection, `Connection: close`).

    Not aiohttp: its server pieces cost the agent ~10 MB resident for two
    read-only GET routes. `health` returns the agent's view (broker
    connected, halted, faults) and the monotonic time of the last watchdog
    tick.
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
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=MAX_REQUEST_BYTES
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            if self._slots.locked():
                await self._respond(writer, 503, b"busy\n", "text/plain")
                return
            async with self._slots, asyncio.timeout(REQUEST_TIMEOUT_S):
                status, body, content_type = await self._handle(reader)
                await self._respond(writer, status, body, content_type)
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError):
            pass  # a slow, vanished or oversized client gets nothing more
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader) -> tuple[int, bytes, str]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return 400, b"bad request\n", "text/plain"
        method, _, rest = head.decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if method != "GET":
            return 405, b"only GET\n", "text/plain"
        if path == "/metrics":
            return 200, self.metrics.render(), CONTENT_TYPE_LATEST
        if path == "/healthz":
            status, health = self._healthz()
            return status, json.dumps(health).encode(), "application/json"
        return 404, b"try /metrics or /healthz\n", "text/plain"

    async def _respond(
        self, writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()

    def _healthz(self) -> tuple[int, dict[str, Any]]:
        health = self.health()
        stalled_s = time.monotonic() - float(health.pop("last_tick", time.monotonic()))
        health["watchdog_age_s"] = round(stalled_s, 3)
        healthy = stalled_s < STALL_AFTER_S
        health["ok"] = healthy
        return (200 if healthy else 503), health
