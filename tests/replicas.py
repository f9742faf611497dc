"""Real token-bucket replicas for tests: subprocesses on free loopback ports.

    with running_replicas(tmp_path, count=3) as cluster:
        cluster[0].take("k")
        cluster.wait_converged("k")

Each replica is its own `python -m token_bucket serve` process with its own
SQLite file and pidfile under the test's directory, gossiping with all the
others. Every process is ended by its own pid, also when the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.brokers import free_port, wait_for_port

HOST = "127.0.0.1"


@dataclass
class ReplicaProcess:
    """One replica: its process, files and HTTP helpers."""

    replica_id: str
    port: int
    directory: Path
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def state_path(self) -> Path:
        return self.directory / f"{self.replica_id}.db"

    @property
    def pidfile(self) -> Path:
        return self.directory / f"{self.replica_id}.pid"

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.replica_id}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None, "replica not started"
        return self.process.pid

    def start(self, timeout: float = 20.0) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=log, env={**os.environ, **self.env}
            )
        wait_for_port(HOST, self.port, timeout=timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; SIGCONT first in case it is paused."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL: the replica gets no chance to clean up."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()

    # ---------------------------------------------------------------- HTTP

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 5.0
    ) -> tuple[int, dict[str, str], Any]:
        """(status, headers, JSON body) of one request; 4xx/5xx do not raise."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                return response.status, dict(response.headers), _json(raw)
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), _json(exc.read())

    def take(self, key: str, n: float = 1) -> tuple[int, Any]:
        status, _, body = self.request("POST", f"/v1/take/{key}?n={n:g}")
        return status, body

    def tokens(self, key: str, timeout: float = 5.0) -> float:
        status, _, body = self.request("GET", f"/v1/buckets/{key}", timeout=timeout)
        assert status == 200, body
        return float(body["tokens"])

    def bucket(self, key: str) -> dict[str, Any]:
        status, _, body = self.request("GET", f"/v1/buckets/{key}")
        assert status == 200, body
        return dict(body)

    def metric(self, name: str) -> float:
        """Value of an unlabelled sample from /metrics (e.g. bucket_state_drift)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        msg = f"{name} not in the metrics of {self.replica_id}"
        raise KeyError(msg)

    def set_gossip_paused(self, paused: bool) -> None:
        status, _, body = self.request("PUT", "/v1/admin/gossip", {"paused": paused})
        assert status == 200, body

    def answers(self, timeout: float = 1.0) -> bool:
        """Whether /healthz answers within `timeout` seconds."""
        try:
            status, _, _ = self.request("GET", "/healthz", timeout=timeout)
        except (OSError, TimeoutError):
            return False
        return status == 200


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


class Cluster(Sequence[ReplicaProcess]):
    """The replicas of one test, indexable like a list."""

    def __init__(self, replicas: list[ReplicaProcess]) -> None:
        self.replicas = replicas

    def __len__(self) -> int:
        return len(self.replicas)

    def __getitem__(self, index: int) -> ReplicaProcess:  # type: ignore[override]
        return self.replicas[index]

    def tokens(self, key: str) -> list[float]:
        return [r.tokens(key) for r in self.replicas]

    def drift(self, key: str, capacity: float) -> float:
        """(max - min) of the replicas' available tokens over the capacity."""
        seen = self.tokens(key)
        return (max(seen) - min(seen)) / capacity

    def wait_converged(
        self, key: str, capacity: float, target: float = 0.02, timeout: float = 10.0
    ) -> float:
        """Seconds until drift of `key` is within `target`; raises on timeout."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.drift(key, capacity) <= target:
                return time.monotonic() - started
            time.sleep(0.05)
        msg = f"drift of {key!r} still {self.drift(key, capacity):.3f} after {timeout}s"
        raise AssertionError(msg)


def replica_argv(
    replica_id: str,
    port: int,
    directory: Path,
    peers: list[str],
    buckets: Sequence[str],
    gossip_interval: str,
    slot: str,
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "token_bucket",
        "serve",
        "--replica-id",
        replica_id,
        "--listen",
        f"{HOST}:{port}",
        "--state",
        str(directory / f"{replica_id}.db"),
        "--pidfile",
        str(directory / f"{replica_id}.pid"),
        "--peers",
        ",".join(peers),
        "--gossip-interval",
        gossip_interval,
        "--slot",
        slot,
        "--admin",
    ]
    for rule in buckets:
        argv += ["--bucket", rule]
    return argv


@contextmanager
def running_replicas(
    directory: Path,
    count: int = 3,
    buckets: Sequence[str] = ("*=100/10",),
    gossip_interval: str = "0.2s",
    slot: str = "1s",
) -> Iterator[Cluster]:
    """Start `count` replicas that gossip with each other; stop them after."""
    directory.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(count)]
    ids = [f"r{i}" for i in range(count)]
    urls = [f"http://{HOST}:{port}" for port in ports]
    replicas = [
        ReplicaProcess(
            replica_id,
            port,
            directory,
            replica_argv(
                replica_id,
                port,
                directory,
                [u for u in urls if u != urls[i]],
                buckets,
                gossip_interval,
                slot,
            ),
        )
        for i, (replica_id, port) in enumerate(zip(ids, ports, strict=True))
    ]
    try:
        for replica in replicas:
            replica.start()
        yield Cluster(replicas)
    finally:
        for replica in replicas:
            replica.stop()
