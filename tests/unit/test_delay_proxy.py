"""The delay proxy's relay on loopback: no privileges, no redirect rules.

The original destination is injected (there is no NAT on loopback), and no
fwmark is set (that needs CAP_NET_ADMIN).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chaos_agent.delay_proxy import (
    CHUNK_BYTES,
    Address,
    ByteBudget,
    DelayLine,
    DelayProxy,
    NetnsSockets,
    ProxySettings,
    parse_original_dst,
)

LOOPBACK = "127.0.0.1"


# ------------------------------------------------------------------ delay line


@given(
    delay=st.floats(0, 1),
    jitter=st.floats(0, 1),
    gaps=st.lists(st.floats(0, 0.5), min_size=1, max_size=50),
    seed=st.integers(),
)
def test_delay_line_never_reorders_and_never_releases_early(
    delay: float, jitter: float, gaps: list[float], seed: int
) -> None:
    """Test that release times never go backwards, and that no chunk is due
    before its arrival plus delay minus jitter."""
    line = DelayLine(delay, jitter, random.Random(seed))
    arrived, last_due = 0.0, 0.0
    for gap in gaps:
        arrived += gap
        due = line.due(arrived)

        assert due >= last_due
        assert due >= arrived + max(delay - jitter, 0.0) - 1e-9
        last_due = due


def test_delay_line_without_jitter_is_exact() -> None:
    """Test that without jitter every chunk is due exactly delay after it
    arrived."""
    line = DelayLine(0.2, 0.0, random.Random(1))

    assert [line.due(t) for t in (1.0, 1.5, 1.6)] == [1.2, 1.7, 1.8]


def test_delay_line_jitter_spreads_around_the_delay() -> None:
    """Test that jitter spreads delays over delay +/- jitter, centred on the
    delay, for chunks far enough apart not to be held by their predecessor."""
    line = DelayLine(0.1, 0.05, random.Random(7))
    delays = [line.due(i * 10.0) - i * 10.0 for i in range(1000)]

    assert 0.05 <= min(delays) < 0.06
    assert 0.14 < max(delays) <= 0.15
    assert abs(sum(delays) / len(delays) - 0.1) < 0.005


# ------------------------------------------------------------------ budget


async def test_byte_budget_makes_takers_wait_for_room() -> None:
    """Test that taking more than the budget has room for waits until enough
    is given back."""
    budget = ByteBudget(100)
    await budget.take(80)
    waiting = asyncio.create_task(budget.take(30))
    await asyncio.sleep(0.01)
    assert not waiting.done()

    budget.give(50)
    await asyncio.wait_for(waiting, 1)

    assert budget.held == 60


async def test_byte_budget_lets_an_oversized_take_through_when_empty() -> None:
    """Test that one chunk larger than the whole budget cannot block forever."""
    budget = ByteBudget(10)

    await asyncio.wait_for(budget.take(25), 1)

    assert budget.held == 25


# ------------------------------------------------------------ original dst


def test_parse_original_dst_reads_a_sockaddr_in() -> None:
    """Test that the sockaddr_in from SO_ORIGINAL_DST decodes to (ip, port)."""
    port_and_address = struct.pack("!H4s", 8080, bytes([198, 18, 0, 1]))
    raw = struct.pack("=H", socket.AF_INET) + port_and_address + bytes(8)

    assert parse_original_dst(raw) == ("198.18.0.1", 8080)


def test_parse_original_dst_rejects_other_families() -> None:
    """Test that an address that is not IPv4 is refused with a clear error."""
    raw = struct.pack("=H", socket.AF_INET6) + bytes(14)

    with pytest.raises(ValueError, match="family"):
        parse_original_dst(raw)


# ------------------------------------------------------------------- relay


class EchoService:
    """A loopback TCP service that echoes and records arrival times."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, bytes]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> Address:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        address: Address = self.server.sockets[0].getsockname()
        return address

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # Tests that cut connections make the echo side see a reset.
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                self.arrivals.append((time.monotonic(), data))
                writer.write(data)
                await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def running_proxy(
    delay_ms: float,
    jitter_ms: float = 0.0,
    target: Callable[[Address], Address] | None = None,
    max_held_bytes: int = 64 * 1024 * 1024,
) -> AsyncIterator[tuple[DelayProxy, EchoService, Address]]:
    """A proxy on loopback in front of an echo service; `target` maps the
    proxy's own address to the destination it relays to."""
    service = EchoService()
    service_address = await service.start()
    sockets = NetnsSockets(None)
    listener = socket.create_server((LOOPBACK, 0))
    route = target or (lambda _: service_address)
    proxy = DelayProxy(
        listener,
        ProxySettings(
            delay_ms=delay_ms,
            jitter_ms=jitter_ms,
            mark=None,
            max_held_bytes=max_held_bytes,
        ),
        sockets,
        destination=lambda sock: route(sock.getsockname()),
        rng=random.Random(3),
    )
    await proxy.start()
    try:
        yield proxy, service, proxy.listen_address
    finally:
        await proxy.abort()
        assert service.server is not None
        service.server.close()


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> float:
    started = time.monotonic()
    writer.write(data)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(data)), 5) == data
    return (time.monotonic() - started) * 1000


async def test_relay_delays_bytes_towards_the_service_only() -> None:
    """Test that a round trip through the proxy takes the delay once: bytes
    towards the service wait, replies do not."""
    async with running_proxy(delay_ms=300) as (_, _, address):
        reader, writer = await asyncio.open_connection(*address)
        elapsed = [await roundtrip(reader, writer, b"ping") for _ in range(3)]
        writer.close()

    # Twice would be 600 ms; a busy machine only ever adds to the once.
    assert all(299 <= ms < 550 for ms in elapsed), elapsed


async def test_relay_keeps_stream_order_under_jitter() -> None:
    """Test that with jitter as large as the delay, a stream of many small
    chunks arrives complete and in order."""
    async with running_proxy(delay_ms=20, jitter_ms=20) as (_, service, address):
        reader, writer = await asyncio.open_connection(*address)
        for i in range(100):
            writer.write(b"%04d" % i)
            await writer.drain()
            await asyncio.sleep(0.001)
        echoed = await asyncio.wait_for(reader.readexactly(400), 10)
        writer.close()

    assert echoed == b"".join(b"%04d" % i for i in range(100))
    assert len(service.arrivals) > 10  # it really was many chunks


async def test_stop_delaying_releases_held_bytes_at_once() -> None:
    """Test that bytes held when the delay is lifted go out immediately, and
    later bytes on the same connection are not delayed."""
    async with running_proxy(delay_ms=5000) as (proxy, _, address):
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"held")
        await writer.drain()
        await asyncio.sleep(0.1)

        started = time.monotonic()
        proxy.close()
        assert await asyncio.wait_for(reader.readexactly(4), 2) == b"held"
        released_after = time.monotonic() - started
        later_ms = await roundtrip(reader, writer, b"later")
        writer.close()

    assert released_after < 1.0
    assert later_ms < 1000


async def test_close_stops_accepting_but_keeps_open_connections() -> None:
    """Test that after close() new connections are refused while an open one
    keeps relaying."""
    async with running_proxy(delay_ms=0) as (proxy, _, address):
        reader, writer = await asyncio.open_connection(*address)
        await roundtrip(reader, writer, b"before")

        proxy.close()
        await asyncio.sleep(0.05)

        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*address)
        await roundtrip(reader, writer, b"after")
        assert proxy.stats.active == 1
        writer.close()


async def test_connection_to_the_proxy_itself_is_refused() -> None:
    """Test that a connection whose original destination is the proxy's own
    address (never redirected) is closed instead of looping."""
    async with running_proxy(delay_ms=0, target=lambda own: own) as running:
        proxy, _, address = running
        reader, writer = await asyncio.open_connection(*address)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

    assert proxy.stats.refused == 1
    assert proxy.stats.relayed == 0


async def test_unreachable_service_closes_the_client_connection() -> None:
    """Test that when the original destination refuses, the client's
    connection is closed, as it would be without the proxy."""
    closed_port = socket.create_server((LOOPBACK, 0))
    dead = closed_port.getsockname()
    closed_port.close()

    async with running_proxy(delay_ms=0, target=lambda _: dead) as running:
        proxy, _, address = running
        reader, writer = await asyncio.open_connection(*address)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

    assert proxy.stats.refused == 1


async def test_half_close_reaches_the_service_after_the_data() -> None:
    """Test that the client's EOF is delayed with the stream, so the service
    receives all bytes before end of stream."""
    async with running_proxy(delay_ms=50) as (_, service, address):
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"last words")
        writer.write_eof()
        echoed = await asyncio.wait_for(reader.read(), 5)
        writer.close()

    assert echoed == b"last words"
    assert b"".join(data for _, data in service.arrivals) == b"last words"


async def test_held_bytes_stay_within_the_budget_and_return_on_abort() -> None:
    """Test that a bulk sender cannot make the proxy hold more than its
    budget (plus one chunk), and that a cut connection gives its bytes back."""
    budget = 256 * 1024
    async with running_proxy(delay_ms=2000, max_held_bytes=budget) as running:
        proxy, _, address = running
        _, writer = await asyncio.open_connection(*address)
        writer.write(bytes(4 * 1024 * 1024))
        await asyncio.sleep(0.5)
        held_while_sending = proxy.held.held

        await proxy.abort()
        writer.close()

    assert 0 < held_while_sending <= budget + CHUNK_BYTES
    assert proxy.held.held == 0
