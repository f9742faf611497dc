"""One replica's state in-process: read-through SQLite, corrupt rows, pruning."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from token_bucket.metrics import ReplicaMetrics
from token_bucket.replica import Replica
from token_bucket.settings import BucketRules, ReplicaSettings, parse_rule

NOW = 1_000_000.5


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def replica(tmp_path: Path, clock: Clock) -> Replica:
    settings = ReplicaSettings(
        replica_id="a",
        state_path=tmp_path / "a.db",
        buckets=BucketRules((parse_rule("*=10/1"),)),
    )
    return Replica(settings, ReplicaMetrics(), clock=clock)


def _write(path: Path, sql: str, *params: object) -> None:
    with sqlite3.connect(path) as db:
        db.execute(sql, params)


def test_a_take_is_on_disk_before_it_is_answered(replica: Replica) -> None:
    """Test that an admitted take is written to SQLite at once."""
    replica.take("k", 3)

    with sqlite3.connect(replica.store.path) as db:
        rows = db.execute("SELECT key, replica, consumed FROM buckets").fetchall()
    assert rows == [("k", "a", 3.0)]


def test_a_write_by_another_connection_is_served_next(replica: Replica) -> None:
    """Test that the replica reads the file again after an outside write."""
    replica.take("k", 3)

    _write(replica.store.path, "UPDATE buckets SET consumed = 8")

    assert replica.view("k")["tokens"] == 2.0


def test_corrupt_rows_are_ignored_counted_and_never_fatal(replica: Replica) -> None:
    """Test that text, NULL, negative and above-capacity counters count as absent."""
    slot = int(NOW)
    for peer, value in [("b", "junk"), ("c", None), ("d", -4.0), ("e", 1e300)]:
        _write(replica.store.path, "INSERT INTO buckets VALUES ('k', ?, ?, ?)",
               peer, slot, value)  # fmt: skip

    view = replica.view("k")

    assert view["tokens"] == 10.0
    assert view["corrupt_rows"] == 4
    assert replica.metrics.registry.get_sample_value("bucket_corrupt_rows") == 4
    assert replica.take("k", 10).allowed


def test_a_peer_value_overwrites_a_corrupt_row(replica: Replica) -> None:
    """Test that merge replaces a corrupt counter with a peer's valid one."""
    slot = int(NOW)
    _write(replica.store.path, "INSERT INTO buckets VALUES ('k', 'b', ?, 'junk')", slot)
    replica.refresh()

    replica.merge({"k": {"b": {slot: 2.0}}})

    view = replica.view("k")
    assert (view["tokens"], view["corrupt_rows"]) == (8.0, 0)
    with sqlite3.connect(replica.store.path) as db:
        assert db.execute("SELECT consumed FROM buckets").fetchall() == [(2.0,)]


def test_a_refused_take_says_when_to_retry(replica: Replica, clock: Clock) -> None:
    """Test that a take beyond the tokens is refused with a positive wait."""
    replica.take("k", 10)

    refused = replica.take("k", 1)

    assert not refused.allowed
    assert 10 <= refused.retry_after_s <= 11.5


def test_prune_removes_old_slots_from_memory_and_disk(
    replica: Replica, clock: Clock
) -> None:
    """Test that counters out of the window leave the state file."""
    replica.take("k", 5)
    clock.now += 30

    dropped = replica.prune()

    assert dropped == 1
    assert replica.view("k")["tokens"] == 10.0
    with sqlite3.connect(replica.store.path) as db:
        assert db.execute("SELECT count(*) FROM buckets").fetchone() == (0,)


def test_an_unreadable_file_is_moved_aside(tmp_path: Path, clock: Clock) -> None:
    """Test that a state file SQLite cannot read does not stop the replica."""
    path = tmp_path / "a.db"
    path.write_bytes(b"this is not a database" * 100)
    settings = ReplicaSettings(replica_id="a", state_path=path)

    replica = Replica(settings, ReplicaMetrics(), clock=clock)

    assert replica.take("k", 1).allowed
    assert len(list(tmp_path.glob("a.db.corrupt-*"))) == 1


def test_a_replica_that_lost_its_file_counts_under_a_new_name(
    tmp_path: Path, clock: Clock
) -> None:
    """Test that new takes after a quarantine are not hidden by peers' copies
    of the counters the replica wrote before it lost its file."""
    path = tmp_path / "a.db"
    path.write_bytes(b"this is not a database" * 100)
    settings = ReplicaSettings(
        replica_id="a", state_path=path, buckets=BucketRules((parse_rule("*=10/1"),))
    )
    replica = Replica(settings, ReplicaMetrics(), clock=clock)
    replica.take("k", 3)

    replica.merge({"k": {"a": {int(NOW): 4.0}}})  # a peer's copy of the old counter

    assert replica.view("k")["tokens"] == 3.0
