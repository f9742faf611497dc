"""Three real token-bucket replicas on loopback: gossip, restarts, HTTP API."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.replicas import running_replicas

pytestmark = pytest.mark.integration

CAPACITY = 100.0


def test_replicas_converge_after_takes_on_every_replica(tmp_path: Path) -> None:
    """Test that drift falls under 2 % within a few gossip intervals."""
    with running_replicas(tmp_path, count=3, buckets=["*=100/2"]) as cluster:
        for replica, tokens in zip(cluster, (10, 20, 5), strict=True):
            assert replica.take("shared", tokens)[0] == 200

        took = cluster.wait_converged("shared", CAPACITY, target=0.02, timeout=10)

        assert cluster.tokens("shared") == [65.0, 65.0, 65.0]
        assert took < 10
        # The gauge is measured before each round's merge: it follows a round
        # later.
        deadline = time.monotonic() + 5
        while any(r.metric("bucket_state_drift") > 0.02 for r in cluster):
            assert time.monotonic() < deadline, "drift gauge stayed above 2 %"
            time.sleep(0.1)


def test_the_cluster_limits_once_the_shared_capacity_is_spent(tmp_path: Path) -> None:
    """Test that a key spent on one replica is refused by another with Retry-After."""
    with running_replicas(tmp_path, count=3, buckets=["*=10/1"]) as cluster:
        assert cluster[0].take("k", 10)[0] == 200
        cluster.wait_converged("k", 10, timeout=10)

        status, headers, body = cluster[2].request("POST", "/v1/take/k")

        assert status == 429
        assert int(headers["Retry-After"]) >= 1
        assert body["allowed"] is False


def test_a_sigkilled_replica_restarts_from_its_state_file(tmp_path: Path) -> None:
    """Test that a replica killed with SIGKILL serves its own takes after restart."""
    with running_replicas(tmp_path, count=1, buckets=["*=100/1"]) as cluster:
        replica = cluster[0]
        replica.take("k", 30)
        replica.kill()

        replica.start()

        assert replica.tokens("k") == 70.0


def test_a_sigkilled_replica_reconverges_with_its_peers(tmp_path: Path) -> None:
    """Test that takes made while a replica was dead reach it after restart."""
    with running_replicas(tmp_path, count=3, buckets=["*=100/1"]) as cluster:
        cluster[0].take("k", 30)
        cluster.wait_converged("k", CAPACITY, timeout=10)
        cluster[0].kill()
        cluster[1].take("k", 20)

        with sqlite3.connect(cluster[0].state_path) as db:
            (on_disk,) = db.execute(
                "SELECT sum(consumed) FROM buckets WHERE replica = 'r0'"
            ).fetchone()
        cluster[0].start()
        cluster.wait_converged("k", CAPACITY, timeout=10)

        assert on_disk == 30
        assert cluster.tokens("k") == [50.0, 50.0, 50.0]


def test_bad_requests_get_400_with_the_reason(tmp_path: Path) -> None:
    """Test that a non-numeric n and an n above capacity are refused clearly."""
    with running_replicas(tmp_path, count=1, buckets=["*=10/1"]) as cluster:
        bad_n = cluster[0].request("POST", "/v1/take/k?n=abc")
        too_many = cluster[0].request("POST", "/v1/take/k?n=11")

        assert bad_n[0] == 400 and "number of tokens" in bad_n[2]["error"]
        assert too_many[0] == 400 and "capacity" in too_many[2]["error"]
        assert cluster[0].tokens("k") == 10.0


def test_metrics_count_requests_by_result(tmp_path: Path) -> None:
    """Test that /metrics counts allowed and limited takes and observes latency."""
    with running_replicas(tmp_path, count=1, buckets=["*=2/1"]) as cluster:
        for _ in range(3):
            cluster[0].take("k")

        text = cluster[0].request("GET", "/metrics")[2]

        assert 'bucket_requests_total{result="allowed"} 2.0' in text
        assert 'bucket_requests_total{result="limited"} 1.0' in text
        assert "bucket_latency_seconds_count 3.0" in text


def test_the_bad_command_line_is_refused_with_the_reason(tmp_path: Path) -> None:
    """Test that a malformed --bucket rule exits with 2 and says how to write it."""
    result = subprocess.run(
        [sys.executable, "-m", "token_bucket", "serve", "--replica-id", "a",
         "--state", str(tmp_path / "a.db"), "--bucket", "oops"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip

    assert result.returncode == 2
    assert "PATTERN=CAPACITY/REFILL_PER_S" in result.stderr
    assert not (tmp_path / "a.db").exists()
