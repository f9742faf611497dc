"""Namespaces, an HTTP service and a client for the proxy engine's tests.

Two throwaway network namespaces joined by a veth pair: the service side at
198.18.0.1, the client side at 198.18.0.2. The service is a real aiohttp
server in its own process inside the service namespace; the client makes real
HTTP/1.1 requests from sockets created inside the client namespace.

Run as a module, this file is also the helper process of the crash tests:
`serve PORT...` runs the service, `apply FAULT_JSON` applies a proxy latency
fault and prints its record, `revert RECORD_JSON` reverts one from scratch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from chaos_agent.delay_proxy import NetnsSockets
from chaos_agent.faults.base import FaultContext
from chaos_agent.faults.proxy_engine import ProxyEngine
from chaos_agent.policy import Policy
from chaos_agent.wire import LatencyFault

if TYPE_CHECKING:
    from chaos_agent.faults.latency import LatencyDriver

SERVICE_ADDRESS = "198.18.0.1"
CLIENT_ADDRESS = "198.18.0.2"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class NetnsPair:
    service: str
    client: str

    @property
    def service_path(self) -> Path:
        return Path("/run/netns") / self.service

    @property
    def client_path(self) -> Path:
        return Path("/run/netns") / self.client


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def netns_pair() -> Iterator[NetnsPair]:
    """Two fresh namespaces joined by veth; both deleted whatever happens."""
    tag = uuid.uuid4().hex[:8]
    pair = NetnsPair(service=f"aspx-{tag}-s", client=f"aspx-{tag}-c")
    try:
        _ip("netns", "add", pair.service)
        _ip("netns", "add", pair.client)
        # Created inside the namespaces, so the names never meet in the root.
        _ip(
            "-n",
            pair.service,
            "link",
            "add",
            "vsvc",
            "type",
            "veth",
            "peer",
            "name",
            "vcli",
            "netns",
            pair.client,
        )
        for ns, dev, address in (
            (pair.service, "vsvc", SERVICE_ADDRESS),
            (pair.client, "vcli", CLIENT_ADDRESS),
        ):
            _ip("-n", ns, "addr", "add", f"{address}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield pair
    finally:
        for ns in (pair.service, pair.client):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def module_process(netns: str | None, *args: str) -> subprocess.Popen[str]:
    """This module run as a process, inside `netns` if given."""
    argv = [sys.executable, "-m", "tests.integration.proxy_netns", *args]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    return subprocess.Popen(
        argv,
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def revert_in_fresh_process(
    record: dict[str, Any], kind: str = "proxy"
) -> dict[str, Any]:
    """Revert `record` the way a restarted agent would: a new process that
    knows nothing but the record. `kind`: proxy (the engine) or latency (the
    agent's latency driver)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.proxy_netns",
            "revert",
            json.dumps(record),
            kind,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    detail: dict[str, Any] = json.loads(done.stdout)
    return detail


def read_line(process: subprocess.Popen[str], timeout: float = 60.0) -> str:
    """The next stdout line of `process`, failing loudly if it dies first."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=0.1):
                line = process.stdout.readline()
                if line:
                    return line.strip()
            if process.poll() is not None:
                err = process.stderr.read() if process.stderr else ""
                msg = f"helper exited with {process.returncode}: {err[-2000:]}"
                raise AssertionError(msg)
    msg = f"helper printed nothing within {timeout}s"
    raise AssertionError(msg)


def stop(process: subprocess.Popen[str]) -> None:
    """End a helper this test started, by its pid."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


@contextlib.contextmanager
def service(pair: NetnsPair, *ports: int) -> Iterator[subprocess.Popen[str]]:
    """The HTTP service in the service namespace, answering on `ports`."""
    process = module_process(pair.service, "serve", *map(str, ports))
    try:
        assert read_line(process) == "ready"
        yield process
    finally:
        stop(process)


# -------------------------------------------------------------------- client


class HttpConnection:
    """One HTTP/1.1 keep-alive connection from a socket in a namespace."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sockets: NetnsSockets, host: str, port: int) -> HttpConnection:
        sock = await sockets.socket()
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (host, port)), 5
            )
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    async def get(self, path: str = "/") -> bytes:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: svc\r\n\r\n".encode())
        return await self.read_response()

    async def read_response(self) -> bytes:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return await asyncio.wait_for(self.reader.readexactly(length), 10)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def timed_request(sockets: NetnsSockets, host: str, port: int) -> float:
    """Milliseconds for connect + GET + response on a new connection."""
    started = time.perf_counter()
    connection = await HttpConnection.open(sockets, host, port)
    try:
        body = await connection.get()
    finally:
        await connection.close()
    assert body == b"ok", body
    return (time.perf_counter() - started) * 1000


async def upload(sockets: NetnsSockets, host: str, port: int, nbytes: int) -> None:
    """POST `nbytes` to the service's sink on a new connection."""
    connection = await HttpConnection.open(sockets, host, port)
    try:
        head = f"POST /sink HTTP/1.1\r\nHost: svc\r\nContent-Length: {nbytes}\r\n\r\n"
        connection.writer.write(head.encode())
        block = bytes(1 << 16)
        for offset in range(0, nbytes, len(block)):
            connection.writer.write(block[: nbytes - offset])
            await connection.writer.drain()
        assert await connection.read_response() == b"ok"
    finally:
        await connection.close()


async def requests_until(
    sockets: NetnsSockets, host: str, port: int, deadline: float
) -> int:
    """GET requests answered on one keep-alive connection before `deadline`
    (time.monotonic)."""
    connection = await HttpConnection.open(sockets, host, port)
    answered = 0
    try:
        while time.monotonic() < deadline:
            assert await connection.get() == b"ok"
            answered += 1
    finally:
        await connection.close()
    return answered


async def median_ms(
    sockets: NetnsSockets, host: str, port: int, count: int = 7
) -> float:
    return statistics.median(
        [await timed_request(sockets, host, port) for _ in range(count)]
    )


# ------------------------------------------------------------ helper process


async def _serve(ports: list[int]) -> None:
    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=b"ok")

    async def sink(request: web.Request) -> web.Response:
        received = 0
        while chunk := await request.content.read(1 << 16):
            received += len(chunk)
        return web.Response(body=b"ok", headers={"X-Received": str(received)})

    app = web.Application(client_max_size=1 << 40)
    app.router.add_get("/", hello)
    app.router.add_post("/sink", sink)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for port in ports:
        await web.TCPSite(runner, "0.0.0.0", port, backlog=1024).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def engine(state_dir: Path, broker: tuple[str, int] | None = None) -> ProxyEngine:
    host, port = broker if broker else (None, None)
    return ProxyEngine(
        FaultContext(
            policy=Policy(), state_dir=state_dir, broker_host=host, broker_port=port
        )
    )


def driver(kind: str) -> ProxyEngine | LatencyDriver:
    """The engine itself, or the agent's latency driver that delegates to it."""
    # Imported here: pyroute2 makes it slow, and the service helper, which
    # must start quickly on a busy machine, does not need it.
    from chaos_agent.faults.latency import LatencyDriver

    if kind == "latency":
        context = FaultContext(policy=Policy(), state_dir=Path("/tmp"))
        return LatencyDriver(context)
    return engine(Path("/tmp"))


async def _apply(fault_json: str, kind: str) -> None:
    fault = LatencyFault.model_validate_json(fault_json)
    applier = driver(kind)
    await applier.available()
    fault_id = str(uuid.uuid4())
    applier.check(fault)
    record = await applier.prepare(fault_id, fault)
    await applier.apply(fault_id, fault, record)
    print(json.dumps(record), flush=True)

    # Runs until stdin closes (then reverts, like an agent told to) or until
    # it is killed (then the record is all that is left).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(json.dumps(await applier.revert(record)), flush=True)


async def _revert(record_json: str, kind: str) -> dict[str, Any]:
    reverter = driver(kind)
    await reverter.available()
    return await reverter.revert(json.loads(record_json))


def main(argv: list[str]) -> None:
    # Logs to stderr: stdout carries the one line the test reads.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    command, *rest = argv
    kind = rest[1] if len(rest) > 1 else "proxy"
    if command == "serve":
        asyncio.run(_serve([int(p) for p in rest]))
    elif command == "apply":
        asyncio.run(_apply(rest[0], kind))
    elif command == "revert":
        print(json.dumps(asyncio.run(_revert(rest[0], kind))), flush=True)
    else:
        msg = f"unknown command {command!r}: use serve, apply or revert"
        raise SystemExit(msg)


if __name__ == "__main__":
    main(sys.argv[1:])
