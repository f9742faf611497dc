"""Token-bucket figures: one replica's latency under open-loop load, and the
time a cluster takes to converge after a partition heals.

Latency is measured from each request's *intended* send time, so a replica
that falls behind pays for its queue (no coordinated omission). The replica
runs pinned to one core; the load generator runs wherever the scheduler puts
it. The figures are only as good as the machine is idle: the load average is
printed first.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from tests.replicas import Cluster, running_replicas

RATES = (200, 500, 1000)
LOAD_SECONDS = 10.0
KEYS = 200
PARTITION_RUNS = 5


class _Connections:
    """Keep-alive HTTP/1.1 connections to one replica, opened on demand.

    Raw streams instead of an HTTP client: the generator shares two CPUs with
    the replica, and every microsecond it spends is one the replica lacks.
    """

    def __init__(self, host: str, port: int, most: int = 256) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(most)

    async def take(self, key: str) -> int:
        """POST a take and return the status code."""
        async with self.slots:
            if self.idle:
                reader, writer = self.idle.pop()
            else:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            request = (
                f"POST /v1/take/{key} HTTP/1.1\r\nHost: {self.host}\r\n"
                "Content-Length: 0\r\n\r\n"
            )
            writer.write(request.encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            self.idle.append((reader, writer))
            return int(head[9:12])

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def _open_loop(url: str, rate: int, seconds: float) -> dict[str, float]:
    """Send `rate` takes per second for `seconds`; latencies from intent."""
    address = urlsplit(url)
    connections = _Connections(address.hostname or "127.0.0.1", address.port or 80)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0

    async def one(index: int, intended: float) -> None:
        nonlocal errors
        try:
            async with asyncio.timeout(10):
                status = await connections.take(f"bench-{index % KEYS}")
            statuses[status] = statuses.get(status, 0) + 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            errors += 1
        latencies.append(time.perf_counter() - intended)

    started = time.perf_counter()
    tasks = []
    total = int(rate * seconds)
    for index in range(total):
        intended = started + index / rate
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index, intended)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    connections.close()

    latencies.sort()
    return {
        "sent": total,
        "throughput": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1],
        "max_ms": 1000 * latencies[-1],
        "ok": statuses.get(200, 0),
        "limited": statuses.get(429, 0),
        "errors": errors + sum(n for s, n in statuses.items() if s >= 500),
    }


def _pin(pid: int, cpu: int) -> None:
    """Pin `pid` to one CPU, if the machine has that many."""
    if cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(pid, {cpu})


def bench_latency(directory: Path) -> None:
    # A bucket roomy enough that most takes are admitted: the write path.
    rules = ["*=100000/10000"]
    with running_replicas(directory, count=1, buckets=rules) as cluster:
        # Only the replica is pinned: pinning the generator too starves it
        # whenever something else runs on its core.
        _pin(cluster[0].pid, 1)
        print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
        for rate in RATES:
            figures = asyncio.run(_open_loop(cluster[0].url, rate, LOAD_SECONDS))
            served = cluster[0].metric("bucket_latency_seconds_sum") / max(
                cluster[0].metric("bucket_latency_seconds_count"), 1
            )
            print(
                f"open loop {rate} req/s for {LOAD_SECONDS:g}s on one core: "
                f"throughput {figures['throughput']:.0f}/s, "
                f"p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms, "
                f"max {figures['max_ms']:.1f} ms, "
                f"200={figures['ok']:.0f} 429={figures['limited']:.0f} "
                f"errors={figures['errors']:.0f}; "
                f"handler mean {served * 1e6:.0f} us (cumulative)",
                flush=True,
            )


def _partition_heal_once(cluster: Cluster, run: int) -> float:
    key = f"heal-{run}"
    for replica in cluster:
        replica.set_gossip_paused(True)
    for index, replica in enumerate(cluster):
        replica.take(key, 10 * (index + 1))
    drift_before = cluster.drift(key, 100)

    for replica in cluster:
        replica.set_gossip_paused(False)
    took = cluster.wait_converged(key, 100, target=0.02, timeout=30)
    print(
        f"  run {run}: drift {drift_before:.0%} during the partition, "
        f"under 2% {took * 1000:.0f} ms after it healed",
        flush=True,
    )
    return took


def bench_convergence(directory: Path) -> None:
    for interval in ("0.5s", "0.1s"):
        with running_replicas(
            directory / interval, count=3, buckets=["*=100/1"], gossip_interval=interval
        ) as cluster:
            print(f"partition heal, 3 replicas, gossip every {interval}:", flush=True)
            times = [
                _partition_heal_once(cluster, run) for run in range(PARTITION_RUNS)
            ]
            print(
                f"time to converge: median {statistics.median(times) * 1000:.0f} ms, "
                f"max {max(times) * 1000:.0f} ms",
                flush=True,
            )


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-token-bucket-") as directory:
        bench_latency(Path(directory) / "latency")
        bench_convergence(Path(directory) / "convergence")


if __name__ == "__main__":
    main()
