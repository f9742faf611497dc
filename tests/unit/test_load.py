"""The open-loop load generator against a small real aiohttp server."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from coordinator.load import Clock, LoadGenerator, Replica

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def counting_server() -> AsyncIterator[tuple[str, list[str]]]:
    """A server that records each path and answers 200, 429 or 503 by key."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path)
        key = request.path.rsplit("/", 1)[-1]
        status = {"key-1": 429, "key-2": 503}.get(key, 200)
        return web.Response(status=status, text="{}")

    runner, url = await _serve(handler)
    try:
        yield url, seen
    finally:
        await runner.cleanup()


@pytest.fixture
async def slow_server() -> AsyncIterator[str]:
    """A server that answers one request at a time, 50 ms each: 20 req/s."""
    lock = asyncio.Lock()

    async def handler(request: web.Request) -> web.Response:
        async with lock:
            await asyncio.sleep(0.05)
        return web.Response(text="{}")

    runner, url = await _serve(handler)
    try:
        yield url
    finally:
        await runner.cleanup()


async def test_schedule_is_fixed_in_advance(
    counting_server: tuple[str, list[str]],
) -> None:
    """Test that request n is due at n / rate and every request is recorded."""
    url, _ = counting_server
    load = LoadGenerator([Replica("a", url)], ["k"], rate=100, clock=Clock())

    await load.run(duration_s=0.5)

    due = sorted(r.t for r in load.records)
    assert len(due) == 50
    gaps = [b - a for a, b in itertools.pairwise(due)]
    assert all(abs(gap - 0.01) < 1e-9 for gap in gaps)


async def test_round_robin_over_replicas_and_keys(
    counting_server: tuple[str, list[str]],
) -> None:
    """Test that replicas alternate and each key is taken from every replica."""
    url, seen = counting_server
    replicas = [Replica("a", url), Replica("b", url)]
    load = LoadGenerator(replicas, ["key-0", "key-9"], rate=200, clock=Clock())

    await load.run(duration_s=0.1)

    ordered = sorted(load.records, key=lambda r: r.t)
    assert [r.replica for r in ordered[:4]] == ["a", "b", "a", "b"]
    assert [r.key for r in ordered[:4]] == ["key-0", "key-0", "key-9", "key-9"]
    assert all(path.startswith("/v1/take/key-") for path in seen)


async def test_statuses_and_failures_are_recorded(
    counting_server: tuple[str, list[str]],
) -> None:
    """Test that 429 is recorded as an answer and 503 as a failure."""
    url, _ = counting_server
    keys = ["key-0", "key-1", "key-2"]
    load = LoadGenerator([Replica("a", url)], keys, rate=300, clock=Clock())

    await load.run(duration_s=0.1)

    by_key = {r.key: r for r in load.records}
    assert (by_key["key-0"].status, by_key["key-0"].failed) == (200, False)
    assert (by_key["key-1"].status, by_key["key-1"].failed) == (429, False)
    assert (by_key["key-2"].status, by_key["key-2"].failed) == (503, True)


async def test_slow_server_shows_queueing_in_latency(slow_server: str) -> None:
    """Test that latency counts the wait behind slow answers (open loop):
    at 50 req/s against a 20 req/s server, late requests wait far longer
    than the 50 ms the server spends on each."""
    load = LoadGenerator(
        [Replica("a", slow_server)], ["k"], rate=50, clock=Clock(), timeout_s=10
    )

    await load.run(duration_s=1.0)

    ordered = sorted(load.records, key=lambda r: r.t)
    assert len(ordered) == 50
    assert all(r.error is None for r in ordered)
    assert ordered[-1].latency_s > 1.0
    assert ordered[-1].latency_s > 5 * ordered[0].latency_s


async def test_transport_error_is_a_failure() -> None:
    """Test that a refused connection is recorded as a failed request."""
    load = LoadGenerator(
        [Replica("gone", "http://127.0.0.1:9")], ["k"], rate=50, clock=Clock()
    )

    await load.run(duration_s=0.1)

    assert load.records
    assert all(r.failed and r.status == 0 and r.error for r in load.records)


async def test_stop_ends_an_open_ended_run(
    counting_server: tuple[str, list[str]],
) -> None:
    """Test that a run without a duration ends when stopped."""
    url, _ = counting_server
    load = LoadGenerator([Replica("a", url)], ["k"], rate=100, clock=Clock())
    task = asyncio.create_task(load.run())

    await asyncio.sleep(0.3)
    load.stop()
    await asyncio.wait_for(task, timeout=5)

    assert 15 <= len(load.records) <= 45


@pytest.fixture
async def connection_server() -> AsyncIterator[tuple[str, list[int]]]:
    """A server that records, per request, the client port of its connection,
    and holds each answer 30 ms so that pools overlap in time."""
    ports: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        peer = (
            request.transport.get_extra_info("peername") if request.transport else None
        )
        ports.append(peer[1] if peer else -1)
        await asyncio.sleep(0.03)
        return web.Response(text="{}")

    runner, url = await _serve(handler)
    try:
        yield url, ports
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("max_age_s", "fresh"), [(None, False), (0.25, True)])
async def test_connections_are_recycled_after_their_max_age(
    connection_server: tuple[str, list[int]], max_age_s: float | None, fresh: bool
) -> None:
    """Test that with a maximum age the load's last requests travel on
    connections that did not exist at its start, that none fails for it,
    and that without one the pool is reused to the end."""
    url, ports = connection_server
    load = LoadGenerator(
        [Replica("a", url)],
        ["k"],
        rate=40,
        clock=Clock(),
        connection_max_age_s=max_age_s,
    )

    await load.run(duration_s=1.2)

    first, last = set(ports[:8]), set(ports[-8:])
    assert len(load.records) == 48
    assert all(r.status == 200 for r in load.records)
    assert first.isdisjoint(last) is fresh, (first, last)
    assert load.stats.pools >= (4 if fresh else 1)


def test_bad_rate_is_refused() -> None:
    """Test that a non-positive rate is a clear error."""
    with pytest.raises(ValueError, match="rate must be positive"):
        LoadGenerator([Replica("a", "http://x")], ["k"], rate=0, clock=Clock())
