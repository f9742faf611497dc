"""The proxy latency engine against the real kernel: nftables, namespaces,
a real HTTP service in one namespace and a client in another."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from chaos_agent.delay_proxy import NetnsSockets
from chaos_agent.faults.base import Record
from chaos_agent.faults.proxy_engine import (
    Exemptions,
    ProxyEngine,
    build_ruleset,
    list_rules,
    run_nft,
    shutdown,
    sweep_tables,
    table_name,
)
from chaos_agent.wire import LatencyFault, NetworkTarget
from tests.integration.proxy_netns import (
    SERVICE_ADDRESS,
    HttpConnection,
    NetnsPair,
    engine,
    median_ms,
    module_process,
    netns_pair,
    read_line,
    revert_in_fresh_process,
    service,
    stop,
    timed_request,
)

pytestmark = [pytest.mark.integration, pytest.mark.root]

HTTP = 8080
OTHER = 1883
DELAY_MS = 200.0


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    with netns_pair() as pair, service(pair, HTTP, OTHER):
        yield pair


@pytest.fixture
async def client(pair: NetnsPair) -> AsyncIterator[NetnsSockets]:
    sockets = NetnsSockets(pair.client_path)
    yield sockets
    sockets.close()


def ingress(pair: NetnsPair, **overrides: object) -> LatencyFault:
    """A fault delaying connections that arrive at the service namespace."""
    spec: dict[str, object] = {
        "delay_ms": DELAY_MS,
        "engine": "proxy",
        "ports": [HTTP],
        "direction": "ingress",
        "where": NetworkTarget(netns=pair.service),
    }
    spec.update(overrides)
    return LatencyFault.model_validate(spec)


async def applied(
    proxy: ProxyEngine, fault: LatencyFault, fault_id: str
) -> tuple[Record, dict[str, Any]]:
    proxy.check(fault)
    record = await proxy.prepare(fault_id, fault)
    detail = await proxy.apply(fault_id, fault, record)
    return record, detail


async def tables(netns: Path) -> list[str]:
    process = await asyncio.create_subprocess_exec(
        "nsenter",
        f"--net={netns}",
        "--",
        "nft",
        "list",
        "tables",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    return out.decode().split()


async def test_ingress_delay_adds_the_asked_latency_and_revert_removes_it(
    pair: NetnsPair, client: NetnsSockets, tmp_path: Path
) -> None:
    """Test that requests to the service take 200 ms longer (within 10 %)
    while the fault is applied, and are fast again after revert."""
    proxy = engine(tmp_path)
    before = await median_ms(client, SERVICE_ADDRESS, HTTP)

    record, detail = await applied(proxy, ingress(pair), "fault-ingress")
    try:
        during = await median_ms(client, SERVICE_ADDRESS, HTTP)
    finally:
        await proxy.revert(record)
    after = await median_ms(client, SERVICE_ADDRESS, HTTP)

    assert detail["engine"] == "proxy"
    assert record["engine"] == "proxy"
    assert DELAY_MS * 0.9 <= during - before <= DELAY_MS * 1.1, (before, during)
    assert after < before + DELAY_MS / 4, (before, after)
    assert record["table"] not in await tables(pair.service_path)


async def test_open_connection_survives_revert_without_delay(
    pair: NetnsPair, client: NetnsSockets, tmp_path: Path
) -> None:
    """Test that a keep-alive connection proxied before revert keeps working
    after it, and is no longer delayed."""
    proxy = engine(tmp_path)
    record, _ = await applied(proxy, ingress(pair), "fault-keepalive")
    connection = await HttpConnection.open(client, SERVICE_ADDRESS, HTTP)
    try:
        started = asyncio.get_running_loop().time()
        assert await connection.get() == b"ok"
        delayed_ms = (asyncio.get_running_loop().time() - started) * 1000

        detail = await proxy.revert(record)

        started = asyncio.get_running_loop().time()
        assert await connection.get() == b"ok"
        after_ms = (asyncio.get_running_loop().time() - started) * 1000
    finally:
        await connection.close()
        await proxy.revert(record)
    for _ in range(50):
        if record["table"] not in await tables(pair.service_path):
            break
        await asyncio.sleep(0.1)

    assert detail["connections_left_open"] == 1
    assert delayed_ms >= DELAY_MS * 0.9
    assert after_ms < DELAY_MS * 0.75
    # Once the last proxied connection closed, nothing of the fault is left.
    assert record["table"] not in await tables(pair.service_path)


async def test_jitter_spreads_latency_around_the_delay(
    pair: NetnsPair, client: NetnsSockets, tmp_path: Path
) -> None:
    """Test that jitter shows as spread: latencies vary across new connections
    and stay within delay +/- jitter."""
    proxy = engine(tmp_path)
    fault = ingress(pair, delay_ms=100.0, jitter_ms=50.0)
    record, _ = await applied(proxy, fault, "fault-jitter")
    try:
        samples = [
            await timed_request(client, SERVICE_ADDRESS, HTTP) for _ in range(20)
        ]
    finally:
        await proxy.revert(record)

    # Uniform over 50..150 ms: the middle 80 % spans about 80 ms. Scheduling
    # on a busy machine only ever adds, so the floor is exact.
    deciles = statistics.quantiles(samples, n=10)
    assert deciles[-1] - deciles[0] > 30, samples
    assert min(samples) >= 50 - 1, samples
    # The middle of 50..150 ms; load on the machine can only push it up.
    assert 75 <= statistics.median(samples) <= 200, samples


async def test_broker_port_is_exempt_from_egress_delay(
    pair: NetnsPair, client: NetnsSockets, tmp_path: Path
) -> None:
    """Test that with the broker's port among the delayed ports, connections
    to the broker go direct while the other port is delayed."""
    proxy = engine(tmp_path, broker=(SERVICE_ADDRESS, OTHER))
    fault = LatencyFault(
        delay_ms=DELAY_MS,
        engine="proxy",
        ports=[HTTP, OTHER],
        direction="egress",
        where=NetworkTarget(netns=pair.client),
    )
    record, detail = await applied(proxy, fault, "fault-broker")
    try:
        broker_ms = await median_ms(client, SERVICE_ADDRESS, OTHER, count=3)
        http_ms = await median_ms(client, SERVICE_ADDRESS, HTTP, count=3)
    finally:
        await proxy.revert(record)

    assert detail["exempt_broker"] is True
    assert broker_ms < DELAY_MS / 2, broker_ms
    assert http_ms >= DELAY_MS * 0.9, http_ms


async def test_revert_twice_succeeds(pair: NetnsPair, tmp_path: Path) -> None:
    """Test that reverting an already reverted fault is success."""
    proxy = engine(tmp_path)
    record, _ = await applied(proxy, ingress(pair), "fault-twice")

    first = await proxy.revert(record)
    second = await proxy.revert(record)

    assert first["table_removed"] is True
    assert second["already_gone"] is True
    assert await list_rules(pair.service_path, record["table"]) == []


@pytest.mark.parametrize("kind", ["proxy", "latency"])
def test_sigkill_leaves_rules_that_a_fresh_revert_removes(
    pair: NetnsPair, kind: str
) -> None:
    """Test that after SIGKILL of the process that applied the fault, new
    connections are refused until a fresh process reverts the record; then
    the table is gone and connections are direct and fast again. Run with the
    engine alone and through the agent's latency driver (its record)."""
    fault = ingress(pair)
    helper = module_process(None, "apply", fault.model_dump_json(), kind)
    try:
        record = json.loads(read_line(helper))
        assert asyncio.run(_latency(pair)) >= DELAY_MS * 0.9
        os.kill(helper.pid, signal.SIGKILL)
        helper.wait(timeout=10)
    finally:
        stop(helper)
    table = record["table"] if kind == "proxy" else record["proxy"]["table"]

    assert table in asyncio.run(tables(pair.service_path))
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(_latency(pair))

    detail = revert_in_fresh_process(record, kind)

    assert detail["engine"] == "proxy"
    assert detail["table_removed"] is True
    assert table not in asyncio.run(tables(pair.service_path))
    assert asyncio.run(_latency(pair)) < DELAY_MS / 2


async def _latency(pair: NetnsPair) -> float:
    sockets = NetnsSockets(pair.client_path)
    try:
        return await timed_request(sockets, SERVICE_ADDRESS, HTTP)
    finally:
        sockets.close()


async def test_shutdown_cuts_draining_connections_and_removes_their_table(
    pair: NetnsPair, client: NetnsSockets, tmp_path: Path
) -> None:
    """Test that the agent's exit path closes connections still open after
    revert and deletes the table that kept them alive."""
    proxy = engine(tmp_path)
    record, _ = await applied(proxy, ingress(pair), "fault-shutdown")
    connection = await HttpConnection.open(client, SERVICE_ADDRESS, HTTP)
    try:
        assert await connection.get() == b"ok"
        await proxy.revert(record)
        assert record["table"] in await tables(pair.service_path)

        await shutdown()

        assert await asyncio.wait_for(connection.reader.read(), 5) == b""
    finally:
        await connection.close()
    assert record["table"] not in await tables(pair.service_path)


async def test_sweep_removes_left_behind_proxy_tables_only(pair: NetnsPair) -> None:
    """Test that the reconcile sweep deletes proxy tables in a namespace and
    leaves every other table alone."""
    left_behind = table_name("fault-left-behind")
    script = build_ruleset(
        left_behind,
        listen_port=40000,
        ports=[HTTP],
        direction="ingress",
        exemptions=Exemptions(),
    )
    await run_nft(pair.service_path, script)
    await run_nft(pair.service_path, "add table ip operator_nat\n")

    swept = await sweep_tables(pair.service_path)

    assert swept == [left_behind]
    assert await tables(pair.service_path) == ["table", "ip", "operator_nat"]


async def test_available_reports_nat_redirect(tmp_path: Path) -> None:
    """Test that this kernel can run the proxy engine and says what it shapes."""
    availability = await engine(tmp_path).available()

    assert availability.ok, availability.reason
    assert availability.facts["nat_redirect"] is True
    assert availability.facts["protocols"] == ["tcp"]


async def test_both_directions_delay_a_request_once(
    pair: NetnsPair, client: NetnsSockets, tmp_path: Path
) -> None:
    """Test that with ingress and egress redirected in the same namespace, the
    proxy's own connection to the service is not redirected again: a request
    is delayed once, not twice."""
    proxy = engine(tmp_path)
    before = await median_ms(client, SERVICE_ADDRESS, HTTP, count=5)

    record, detail = await applied(proxy, ingress(pair, direction="both"), "both")
    try:
        during = await median_ms(client, SERVICE_ADDRESS, HTTP, count=5)
    finally:
        await proxy.revert(record)

    assert len([r for r in detail["rules"] if " redirect to " in r]) == 2
    assert DELAY_MS * 0.9 <= during - before <= DELAY_MS * 1.5, (before, during)
