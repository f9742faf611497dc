"""A userspace TCP delay proxy: the latency engine for kernels without netem.

nftables rules (see `chaos_agent.faults.proxy_engine`) redirect new TCP
connections to a listening socket owned by `DelayProxy`. For each accepted
connection the proxy reads where the client meant to go (SO_ORIGINAL_DST),
opens its own connection there, and relays bytes both ways. Bytes sent
towards the service (the side that accepted the original connection) are held
back: each chunk is released at its arrival time plus the delay, plus or minus
a uniform jitter. A chunk is never released before the one ahead of it, so
jitter spreads a stream out but cannot reorder it.

What this is not: netem. It delays a byte stream, not packets; it cannot drop,
duplicate, corrupt or reorder; it sees only connections opened after its rules
went in; it speaks TCP over IPv4 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

# <linux/netfilter_ipv4.h>: SO_ORIGINAL_DST, read at level SOL_IP, returns the
# destination a connection had before NAT rewrote it (a struct sockaddr_in).
SO_ORIGINAL_DST: Final = 80
_SOCKADDR_IN_SIZE: Final = 16

# The proxy's own outbound connections carry this fwmark (SO_MARK) and the
# redirect rules skip marked traffic, so the proxy never redirects to itself.
# "AFTS" in ASCII: a value that no CNI or kube-proxy mark bit uses.
PROXY_MARK: Final = 0x41465453

# Chunks read at once from either side; large enough that a bulk transfer is
# a few hundred wake-ups per second, small enough to keep latency per chunk.
CHUNK_BYTES: Final = 64 * 1024

# Bytes held back per stream: one stream's throughput is at most this much
# per delay (4 MiB / 200 ms = 20 MiB/s); beyond that the proxy stops reading
# and TCP flow control slows the sender, as a long fat pipe would.
MAX_STREAM_HELD_BYTES: Final = 4 * 1024 * 1024

# Bytes held back by one proxy over all its streams, so that a fault on a busy
# service cannot grow the agent without bound: many streams share this.
MAX_HELD_BYTES: Final = 64 * 1024 * 1024

# Seconds a closing connection may take to flush what it still has to send.
_CLOSE_TIMEOUT_S: Final = 5.0

# <sched.h>: the namespace type argument of setns(2).
_CLONE_NEWNET: Final = 0x40000000

log = structlog.get_logger("chaos_agent.delay_proxy")

Address = tuple[str, int]


class ProxyError(Exception):
    """The proxy could not be started where it was asked to run."""


def parse_original_dst(raw: bytes) -> Address:
    """Decode the struct sockaddr_in that SO_ORIGINAL_DST returns."""
    if len(raw) < 8:
        msg = f"SO_ORIGINAL_DST returned {len(raw)} bytes, expected a sockaddr_in"
        raise ValueError(msg)

    # sin_family is in host order, sin_port and sin_addr in network order.
    (family,) = struct.unpack_from("=H", raw, 0)
    port, packed = struct.unpack_from("!H4s", raw, 2)
    if family != socket.AF_INET:
        msg = f"SO_ORIGINAL_DST returned address family {family}, expected AF_INET"
        raise ValueError(msg)
    return str(ipaddress.IPv4Address(packed)), port


def original_destination(sock: socket.socket) -> Address:
    """Where the client behind an accepted, redirected socket meant to go."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_SIZE)
    return parse_original_dst(raw)


# ------------------------------------------------------------ network namespace

# `chaos_agent.targets` resolves which namespace a fault means, but offers no
# way to put a thread into one (pyroute2 forks a helper for netlink instead).
# Sockets need the thread itself in the namespace, hence this small helper;
# it belongs in `targets` if another module comes to need it.
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            msg = f"cannot enter network namespace {path}: {os.strerror(err)}"
            raise ProxyError(msg)
    finally:
        os.close(fd)


class NetnsSockets:
    """Creates sockets inside one network namespace.

    A socket stays in the namespace it was created in, whatever thread uses it
    later. So one worker thread enters the namespace once and only ever makes
    sockets; the event loop thread never leaves the agent's own namespace.
    `path` None means the caller's own namespace (no thread at all).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        if path is not None:
            self._executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"netns:{path}",
                initializer=_setns,
                initargs=(path,),
            )

    async def socket(self) -> socket.socket:
        """A new IPv4 TCP socket in the namespace."""
        if self._executor is None:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, socket.socket, socket.AF_INET, socket.SOCK_STREAM
            )
        except Exception as exc:
            # The initializer failed (namespace gone or not enterable): the
            # pool is broken for good, so say where it was meant to run.
            msg = f"cannot create a socket in network namespace {self.path}: {exc}"
            raise ProxyError(msg) from exc

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)


# ---------------------------------------------------------------- delay line


class DelayLine:
    """Release times for the chunks of one stream.

    Each chunk is due at arrival + delay +/- jitter (uniform, never negative),
    but never before the chunk ahead of it: order within a stream is kept.
    """

    def __init__(self, delay_s: float, jitter_s: float, rng: random.Random) -> None:
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self._rng = rng
        self._last_due = 0.0

    def due(self, arrived_at: float) -> float:
        delay = self.delay_s
        if self.jitter_s:
            delay += self._rng.uniform(-self.jitter_s, self.jitter_s)
        due = max(arrived_at + max(delay, 0.0), self._last_due)
        self._last_due = due
        return due


# --------------------------------------------------------------------- proxy


class ByteBudget:
    """Bytes that may be held at once; taking more waits for some to be given
    back. A single take larger than the limit passes when nothing is held."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._given = asyncio.Event()

    async def take(self, count: int) -> None:
        while self.held and self.held + count > self.limit:
            self._given.clear()
            await self._given.wait()
        self.held += count

    def give(self, count: int) -> None:
        self.held -= count
        self._given.set()


@dataclass(frozen=True, kw_only=True)
class ProxySettings:
    delay_ms: float
    jitter_ms: float = 0.0
    max_stream_held_bytes: int = MAX_STREAM_HELD_BYTES
    max_held_bytes: int = MAX_HELD_BYTES
    # Outbound connections are marked so the redirect rules let them pass;
    # None (tests without CAP_NET_ADMIN, no redirect rules) leaves them bare.
    mark: int | None = PROXY_MARK


@dataclass
class ProxyStats:
    accepted: int = 0
    relayed: int = 0
    refused: int = 0
    active: int = 0
    bytes_delayed: int = 0


class DelayProxy:
    """Accepts redirected connections and relays them with added delay.

    `start()` serves on an already bound socket; `stop_delaying()` releases
    everything held and relays further bytes at once; `close()` stops
    accepting. Connections open at `close()` keep relaying, undelayed, until
    either end closes them; `abort()` cuts them.
    """

    def __init__(
        self,
        listener: socket.socket,
        settings: ProxySettings,
        sockets: NetnsSockets,
        *,
        destination: Callable[[socket.socket], Address] = original_destination,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.stats = ProxyStats()
        self.listen_address: Address = listener.getsockname()
        self._listener = listener
        self._sockets = sockets
        self._destination = destination
        self._rng = rng or random.Random()
        self._server: asyncio.Server | None = None
        self._undelayed = asyncio.Event()
        self.held = ByteBudget(settings.max_held_bytes)
        self._connections: set[asyncio.Task[None]] = set()
        self._log = log.bind(listen_port=self.listen_address[1])

    @property
    def delaying(self) -> bool:
        return not self._undelayed.is_set()

    async def start(self) -> None:
        self._listener.setblocking(False)
        self._server = await asyncio.start_server(self._accepted, sock=self._listener)

    def stop_delaying(self) -> None:
        self._undelayed.set()

    def close(self) -> None:
        """Stop accepting; open connections go on, undelayed."""
        self.stop_delaying()
        if self._server is not None:
            # Not awaiting wait_closed(): from Python 3.12 on it waits for
            # every open connection, which must outlive the fault.
            self._server.close()
        self._sockets.close()

    async def abort(self) -> None:
        """Stop accepting and cut every open connection."""
        self.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drained(self) -> None:
        """Wait until every proxied connection has ended."""
        while self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)

    # --------------------------------------------------------- one connection

    async def _accepted(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None  # a connection callback always runs in a task
        self._connections.add(task)
        self.stats.accepted += 1
        self.stats.active += 1
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            # abort() cut the connection; this task is the end of the line,
            # and asyncio's server callback logs a cancelled one as an error.
            pass
        finally:
            self.stats.active -= 1
            self._connections.discard(task)

    async def _relay(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        client = client_writer.get_extra_info("socket")
        peer = client_writer.get_extra_info("peername")
        try:
            target = self._destination(client)
        except (OSError, ValueError) as exc:
            self._log.warning("proxy_no_destination", peer=peer, error=str(exc))
            await _close(client_writer)
            return

        # A connection straight to the listen port was never redirected: its
        # original destination is the proxy itself, and relaying would loop.
        if target == client.getsockname():
            self.stats.refused += 1
            await _close(client_writer)
            return

        try:
            service_reader, service_writer = await self._connect(target)
        except OSError as exc:
            # The client sees its connection close, as if the service had
            # refused it; what it would have seen without the proxy.
            self.stats.refused += 1
            self._log.info("proxy_upstream_refused", target=target, error=str(exc))
            await _close(client_writer)
            return

        self.stats.relayed += 1
        _nodelay(client)
        try:
            await self._pump(
                client_reader, service_reader, client_writer, service_writer
            )
        except asyncio.CancelledError:
            # Cut, not closed: a graceful close would wait to flush bytes
            # that a peer no longer being read from may never accept.
            service_writer.transport.abort()
            client_writer.transport.abort()
            raise
        finally:
            await _close(service_writer)
            await _close(client_writer)

    async def _pump(
        self,
        client_reader: asyncio.StreamReader,
        service_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        service_writer: asyncio.StreamWriter,
    ) -> None:
        try:
            async with asyncio.TaskGroup() as streams:
                streams.create_task(
                    self._delayed(client_reader, service_writer), name="towards-service"
                )
                streams.create_task(
                    _copy(service_reader, client_writer), name="towards-client"
                )
        except* (ConnectionError, OSError) as group:
            self._log.debug("proxy_connection_reset", error=str(group))

    async def _connect(
        self, target: Address
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = await self._sockets.socket()
        try:
            sock.setblocking(False)
            if self.settings.mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.settings.mark)
            _nodelay(sock)
            await asyncio.get_running_loop().sock_connect(sock, target)
            return await asyncio.open_connection(sock=sock, limit=CHUNK_BYTES)
        except BaseException:
            sock.close()
            raise

    async def _delayed(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Relay `reader` to `writer`, each chunk released at its due time."""
        line = DelayLine(
            self.settings.delay_ms / 1000, self.settings.jitter_ms / 1000, self._rng
        )
        stream = ByteBudget(self.settings.max_stream_held_bytes)
        # (due, chunk); an empty chunk is end of stream, delayed like data so
        # a half-close never overtakes the bytes before it.
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        # What this stream took from the proxy's budget and has not given back.
        taken = 0

        async def hold() -> None:
            nonlocal taken
            while True:
                chunk = await reader.read(CHUNK_BYTES)
                await stream.take(len(chunk))
                await self.held.take(len(chunk))
                taken += len(chunk)
                # Stamped once there was room: bytes a full pipe made wait
                # were not in it yet, so their delay starts now.
                held.put_nowait((line.due(time.monotonic()), chunk))
                if not chunk:
                    return

        async def release() -> None:
            nonlocal taken
            while True:
                due, chunk = await held.get()
                wait = due - time.monotonic()
                if wait > 0 and self.delaying:
                    # Revert sets the event: whatever is held goes out at once.
                    # (asyncio.timeout, not wait_for: on Python 3.11 wait_for
                    # loses a cancel that lands as the event fires, and abort()
                    # does exactly that.)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._undelayed.wait()
                if not chunk:
                    _write_eof(writer)
                    return
                self.stats.bytes_delayed += len(chunk)
                writer.write(chunk)
                await writer.drain()
                stream.give(len(chunk))
                self.held.give(len(chunk))
                taken -= len(chunk)

        try:
            async with asyncio.TaskGroup() as both:
                both.create_task(hold())
                both.create_task(release())
        finally:
            # A connection cut with bytes still held returns them to the pool.
            self.held.give(taken)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(CHUNK_BYTES):
        writer.write(chunk)
        await writer.drain()
    _write_eof(writer)


def _write_eof(writer: asyncio.StreamWriter) -> None:
    if writer.can_write_eof() and not writer.is_closing():
        with contextlib.suppress(OSError):
            writer.write_eof()


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close gracefully, or cut the connection if its peer stops reading."""
    writer.close()
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT_S):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass


def _nodelay(sock: socket.socket) -> None:
    # Nagle's algorithm would hold small writes back for up to a delayed-ACK
    # period (40 ms here) and add latency nobody asked for.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def bind_listener(sockets: NetnsSockets, avoid_ports: set[int]) -> socket.socket:
    """A listening TCP socket on an ephemeral port inside the proxy's namespace.

    Bound to every address, since a prerouting redirect rewrites the
    destination to the address of the interface the connection came in on.
    """
    for _ in range(8):
        sock = await sockets.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 0))
        if sock.getsockname()[1] not in avoid_ports:
            sock.listen(1024)
            return sock
        sock.close()
    msg = "could not find a free listen port outside the ports to delay"
    raise ProxyError(msg)
