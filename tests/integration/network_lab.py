"""A throwaway two-namespace network for network fault tests.

Two namespaces joined by a veth pair on 198.18.0.0/24 (the benchmarking
range; nothing is routed out). Sockets are made inside a namespace from a
short-lived thread that enters it (setns acts on the calling thread only), so
traffic is generated and measured in the test process itself.

Everything is removed on exit, even when the test fails: deleting a namespace
deletes its veth end, its qdiscs and its nft tables with it.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from pyroute2.netns import setns

_counter = itertools.count()


@dataclass(frozen=True)
class Lab:
    ns_a: str
    ns_b: str
    if_a: str
    if_b: str
    addr_a: str
    addr_b: str

    @property
    def path_a(self) -> str:
        return f"/run/netns/{self.ns_a}"

    @property
    def path_b(self) -> str:
        return f"/run/netns/{self.ns_b}"


def ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        msg = f"ip {' '.join(args)} failed: {result.stderr.strip()}"
        raise RuntimeError(msg)
    return result.stdout


def run_in(ns: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *command],
        capture_output=True,
        text=True,
        check=False,
    )


@contextmanager
def two_namespaces(subnet: int = 0) -> Iterator[Lab]:
    """Namespaces A and B, veth A<->B, 198.18.<subnet>.1 and .2, default
    route in A through the veth (so "the default route's interface" exists)."""
    tag = f"as{os.getpid() % 100000}x{next(_counter)}"
    lab = Lab(
        ns_a=f"{tag}a",
        ns_b=f"{tag}b",
        if_a=f"{tag}va"[:15],
        if_b=f"{tag}vb"[:15],
        addr_a=f"198.18.{subnet}.1",
        addr_b=f"198.18.{subnet}.2",
    )
    created: list[str] = []
    try:
        for ns in (lab.ns_a, lab.ns_b):
            ip("netns", "add", ns)
            created.append(ns)
        ip("link", "add", lab.if_a, "netns", lab.ns_a, "type", "veth",
           "peer", "name", lab.if_b, "netns", lab.ns_b)  # fmt: skip
        for ns, ifname, addr in (
            (lab.ns_a, lab.if_a, lab.addr_a),
            (lab.ns_b, lab.if_b, lab.addr_b),
        ):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            ip("-n", ns, "link", "set", ifname, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", lab.ns_a, "route", "add", "default", "via", lab.addr_b)
        yield lab
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def root_qdiscs(ns: str) -> list[str]:
    """`tc qdisc show` lines of a namespace, for asserting what is left."""
    return run_in(ns, "tc", "qdisc", "show").stdout.strip().splitlines()


def owned_qdiscs(ns: str) -> list[str]:
    return [line for line in root_qdiscs(ns) if " a5" in line]


# -------------------------------------------------------------------- sockets

_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns-socket")


def socket_in(ns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket created inside namespace `ns` (it stays there for life)."""

    def make() -> socket.socket:
        # A fresh thread per socket: the thread's namespace changes for good.
        result: list[socket.socket] = []

        def enter_and_create() -> None:
            setns(f"/run/netns/{ns}", flags=0)
            result.append(socket.socket(socket.AF_INET, kind))

        thread = threading.Thread(target=enter_and_create)
        thread.start()
        thread.join()
        return result[0]

    return _pool.submit(make).result()


@dataclass
class Sink:
    """A TCP server in a namespace that accepts and drains every connection,
    counting what it received."""

    port: int
    received: int = 0


@contextmanager
def tcp_sink(ns: str, address: str) -> Iterator[Sink]:
    server = socket_in(ns)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, 0))
    server.listen(64)
    server.settimeout(0.2)
    sink = Sink(port=int(server.getsockname()[1]))
    stop = threading.Event()
    lock = threading.Lock()

    def drain(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                while data := conn.recv(65536):
                    with lock:
                        sink.received += len(data)
            except OSError:
                pass

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=drain, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        stop.set()
        thread.join(timeout=2)
        server.close()


def throughput_kbit(ns: str, address: str, sink: Sink, seconds: float = 2.0) -> float:
    """Send from `ns` as fast as TCP allows; kbit/s the sink received, counted
    after a warm-up so the socket buffers filling up do not count."""
    client = socket_in(ns)
    client.settimeout(10)
    chunk = b"x" * 16384
    warmup = 0.5
    with client:
        client.connect((address, sink.port))
        start = time.monotonic()
        mark: tuple[float, int] | None = None
        while (now := time.monotonic()) - start < warmup + seconds:
            if mark is None and now - start >= warmup:
                mark = (now, sink.received)
            client.send(chunk)
        end, received = time.monotonic(), sink.received
    assert mark is not None
    return (received - mark[1]) * 8 / 1000 / (end - mark[0])


def connect_times_ms(
    ns: str, address: str, port: int, count: int = 10, timeout: float = 5.0
) -> list[float]:
    """TCP handshake times from `ns`: one round trip each (SYN, SYN-ACK)."""
    times = []
    for _ in range(count):
        client = socket_in(ns)
        client.settimeout(timeout)
        with client:
            start = time.perf_counter()
            client.connect((address, port))
            times.append((time.perf_counter() - start) * 1000)
    return times


def can_connect(ns: str, address: str, port: int, timeout: float = 1.0) -> bool:
    client = socket_in(ns)
    client.settimeout(timeout)
    with client:
        try:
            client.connect((address, port))
        except OSError:
            return False
    return True
