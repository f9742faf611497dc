"""Real MQTT brokers for tests: Mosquitto and the embedded (amqtt) one.

Each broker is a subprocess on a free loopback port, ended by its own pid.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# Where free_port() looks, up to the kernel's ephemeral range.
PRIVATE_PORTS_FROM: Final = 20000


def free_port() -> int:
    """A TCP port free on loopback now, picked below the kernel's ephemeral
    range: a port from that range can be handed to one of the many outgoing
    connections of a test (MQTT clients, load) between this pick and the
    server's own bind, and the server then fails with "address in use"."""
    low = _ephemeral_low()
    for _ in range(100):
        port = random.randrange(PRIVATE_PORTS_FROM, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    msg = f"no free port in {PRIVATE_PORTS_FROM}-{low - 1} on 127.0.0.1"
    raise RuntimeError(msg)


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low = int(text.split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    # A kernel tuned to a wide ephemeral range leaves no room below it; then
    # take the usual default and rely on the bind check alone.
    return low if low > PRIVATE_PORTS_FROM + 1000 else 32768


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 15.0,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until something accepts connections on host:port; give up early
    if `process`, which should be listening there, has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            msg = f"the process for {host}:{port} exited with {process.returncode}"
            raise RuntimeError(msg)
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    msg = f"nothing listens on {host}:{port} after {timeout:g}s"
    raise TimeoutError(msg)


@dataclass
class Broker:
    kind: str
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def mosquitto_config(port: int, extra: str = "") -> str:
    # TCP_NODELAY on both sides removes the ~45 ms Nagle/delayed-ACK stall of
    # every QoS 1 round trip (measured on these machines).
    return (
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "set_tcp_nodelay true\n"
        "persistence false\n"
        "log_dest stderr\n"
        "log_type error\nlog_type warning\n"
        f"{extra}"
    )


def start_mosquitto(
    workdir: Path,
    port: int | None = None,
    extra: str = "",
    raw_config: str | None = None,
) -> Broker:
    """Start Mosquitto on `port` with the test config (plus `extra` lines), or
    with `raw_config` as it is (which must listen on `port`)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = port or free_port()
    config = workdir / f"mosquitto-{port}.conf"
    config.write_text(raw_config or mosquitto_config(port, extra))
    log_path = workdir / f"mosquitto-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
    broker = Broker("mosquitto", "127.0.0.1", port, process, log_path)
    try:
        wait_for_port(broker.host, port, process=process)
    except (TimeoutError, RuntimeError) as exc:
        broker.stop()
        msg = f"{broker.kind} did not start: {exc}\n{broker.log()[-2000:]}"
        raise RuntimeError(msg) from None
    return broker


def start_embedded(workdir: Path, port: int | None = None) -> Broker:
    port = port or free_port()
    log_path = workdir / f"embedded-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "coordinator.cli",
                "broker",
                "--listen",
                f"127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    broker = Broker("embedded", "127.0.0.1", port, process, log_path)
    try:
        wait_for_port(broker.host, port, process=process)
    except (TimeoutError, RuntimeError) as exc:
        broker.stop()
        msg = f"{broker.kind} did not start: {exc}\n{broker.log()[-2000:]}"
        raise RuntimeError(msg) from None
    return broker


@contextmanager
def running_broker(
    kind: str, workdir: Path, port: int | None = None
) -> Iterator[Broker]:
    start = start_mosquitto if kind == "mosquitto" else start_embedded
    broker = start(workdir, port)
    try:
        yield broker
    finally:
        broker.stop()
