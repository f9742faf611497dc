"""Probes against real servers: three token-bucket replicas, and Debian's
Prometheus scraping them."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from coordinator.load import Clock, Replica
from coordinator.probes import (
    DriftProbe,
    ProbeError,
    PrometheusProbe,
    scrape_metrics,
    service_deltas,
)
from tests.brokers import free_port, wait_for_port
from tests.replicas import Cluster, running_replicas

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_replicas(tmp_path / "replicas", count=3) as replicas:
        yield replicas


@pytest.fixture
def prometheus(tmp_path: Path, cluster: Cluster) -> Iterator[str]:
    """A Prometheus server scraping the cluster every second; ended by pid,
    its data directory deleted."""
    if not Path(PROMETHEUS).exists():
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    port = free_port()
    data = tmp_path / "prometheus-data"
    targets = ", ".join(f"'127.0.0.1:{r.port}'" for r in cluster)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: token-bucket\n    static_configs: [{{targets: [{targets}]}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        _wait_ready(f"http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def _wait_ready(url: str, timeout: float = 30.0) -> None:
    # The port opens before the storage is; /-/ready says 200 once queries work.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    msg = f"Prometheus at {url} not ready after {timeout:g}s"
    raise TimeoutError(msg)


async def test_query_range_returns_each_replicas_requests(
    cluster: Cluster, prometheus: str
) -> None:
    """Test that query_range through the probe returns one series per
    replica once Prometheus has scraped takes we made."""
    for replica in cluster:
        for _ in range(3):
            replica.take("k")
    probe = PrometheusProbe(prometheus)
    query = "sum by (instance) (bucket_requests_total)"

    async with aiohttp.ClientSession() as http:
        series = []
        deadline = time.time() + 30
        while time.time() < deadline:
            series = await probe.query_range(http, query, time.time() - 30, time.time())
            if len(series) == 3 and all(s.points for s in series):
                break
            await asyncio.sleep(0.5)

    assert len(series) == 3
    assert all(s.points[-1][1] >= 3 for s in series)
    assert {s.labels["instance"] for s in series} == {
        f"127.0.0.1:{r.port}" for r in cluster
    }


async def test_bad_query_is_a_probe_error(prometheus: str) -> None:
    """Test that a query Prometheus refuses raises ProbeError with its reason."""
    probe = PrometheusProbe(prometheus)

    async with aiohttp.ClientSession() as http:
        with pytest.raises(ProbeError, match="refused"):
            await probe.query_range(http, "sum(", time.time() - 10, time.time())


async def test_scrape_reads_the_service_metrics(cluster: Cluster) -> None:
    """Test that a direct scrape parses the replica's counters by label."""
    cluster[0].take("k")

    async with aiohttp.ClientSession() as http:
        samples = await scrape_metrics(http, cluster[0].url + "/metrics")

    results = {
        labels.get("result"): v for labels, v in samples["bucket_requests_total"]
    }
    assert sum(results.values()) >= 1
    assert "bucket_latency_seconds_bucket" in samples


async def test_service_deltas_count_the_run_and_see_a_restart(
    cluster: Cluster,
) -> None:
    """Test that the service's counters become deltas over a run, and that a
    restart (counters back to zero) is flagged instead of going negative."""
    cluster[0].take("k")
    async with aiohttp.ClientSession() as http:
        before = await scrape_metrics(http, cluster[0].url + "/metrics")
        for _ in range(3):
            cluster[0].take("k")
        steady = await scrape_metrics(http, cluster[0].url + "/metrics")
        cluster[0].restart()
        cluster[0].take("k")
        restarted = await scrape_metrics(http, cluster[0].url + "/metrics")

    assert service_deltas(before, steady)["allowed"] == 3
    assert service_deltas(before, steady)["restarted"] == 0
    assert service_deltas(steady, restarted)["restarted"] == 1
    assert service_deltas(steady, restarted)["allowed"] == 1


async def test_drift_probe_sees_a_replica_that_has_not_merged(cluster: Cluster) -> None:
    """Test that drift shows while one replica's gossip is paused and its
    takes are not shared, and that a dead replica is left out."""
    cluster[1].set_gossip_paused(True)
    for _ in range(10):
        cluster[1].take("k")
    replicas = [Replica(r.replica_id, r.url) for r in cluster]
    replicas.append(Replica("dead", "http://127.0.0.1:9"))
    probe = DriftProbe(replicas, ["k"], Clock())

    async with aiohttp.ClientSession() as http:
        [sample] = await probe.sample(http)

    assert set(sample.tokens) == {"r0", "r1", "r2"}
    assert sample.capacity == 100
    assert sample.drift == pytest.approx(0.10, abs=0.02)
