"""The agent's /metrics and /healthz server, over a real loopback socket, and
the capability probe in a child process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chaos_agent.capabilities import probe_faults, probe_faults_isolated
from chaos_agent.faults import load_driver
from chaos_agent.faults.base import FaultContext
from chaos_agent.policy import Policy
from chaos_agent.telemetry import MAX_REQUEST_BYTES, Metrics, MetricsServer
from tests.brokers import free_port


@pytest.fixture
async def server() -> AsyncIterator[MetricsServer]:
    def health() -> dict[str, Any]:
        return {"broker_connected": True, "last_tick": time.monotonic()}

    metrics = Metrics()
    metrics.faults_applied.labels("cpu").inc()
    server = MetricsServer(metrics, health, "127.0.0.1", free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def request(server: MetricsServer, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(raw)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def test_metrics_and_healthz_answer(server: MetricsServer) -> None:
    """Test that GET /metrics gives the Prometheus text and GET /healthz the
    JSON health with status 200."""
    metrics = await request(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    health = await request(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")

    assert metrics.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b'aftershock_agent_faults_applied_total{type="cpu"} 1.0' in metrics
    assert health.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b'"broker_connected": true' in health


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
        (b"GET /admin HTTP/1.1\r\n\r\n", b"404"),
        (
            b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST_BYTES + b"\r\n\r\n",
            b"400",
        ),
    ],
    ids=["post", "unknown-path", "oversized"],
)
async def test_bad_requests_get_nothing_useful(
    server: MetricsServer, raw: bytes, status: bytes
) -> None:
    """Test that other methods, unknown paths and oversized requests are
    refused, and the server still answers afterwards."""
    answer = await request(server, raw)
    after = await request(server, b"GET /healthz HTTP/1.1\r\n\r\n")

    assert answer.split(b" ")[1] == status
    assert after.startswith(b"HTTP/1.1 200")


async def test_isolated_probe_matches_the_in_process_one(tmp_path: Path) -> None:
    """Test that probing the drivers in a child process gives the same
    availability as probing them here."""
    context = FaultContext(policy=Policy(), state_dir=tmp_path)

    isolated = await probe_faults_isolated(context)
    here = await probe_faults(load_driver, context)

    assert {k: v.ok for k, v in isolated.items()} == {k: v.ok for k, v in here.items()}
    assert isolated["cpu"].facts == here["cpu"].facts
