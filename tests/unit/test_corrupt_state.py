"""The corrupt-state fault driver against real SQLite, JSON and binary files."""

from __future__ import annotations

import json
import sqlite3
import struct
from pathlib import Path
from typing import Any

import pytest

from chaos_agent.faults.base import FaultContext, FaultRejected
from chaos_agent.faults.corrupt_state import CorruptStateDriver
from chaos_agent.policy import Policy, PolicyViolation
from chaos_agent.wire import CorruptStateFault
from token_bucket.store import SCHEMA

ROWS = [
    ("user:1", "a", 100, 4.0),
    ("user:1", "b", 100, 2.0),
    ("user:2", "a", 100, 7.0),
    ("admin", "a", 100, 9.0),
]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "states"
    directory.mkdir()
    return directory


@pytest.fixture
def driver(tmp_path: Path, state_dir: Path) -> CorruptStateDriver:
    policy = Policy(allowed_state_paths=[state_dir])
    return CorruptStateDriver(FaultContext(policy=policy, state_dir=tmp_path / "agent"))


@pytest.fixture
def database(state_dir: Path) -> Path:
    path = state_dir / "buckets.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(SCHEMA)
        db.executemany("INSERT INTO buckets VALUES (?, ?, ?, ?)", ROWS)
    return path


def _values(path: Path) -> dict[tuple[str, str], Any]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT key, replica, consumed FROM buckets").fetchall()
    return {(key, replica): value for key, replica, value in rows}


async def _inject(
    driver: CorruptStateDriver, fault: CorruptStateFault
) -> tuple[dict[str, Any], dict[str, Any]]:
    driver.check(fault)
    record = await driver.prepare("f1", fault)
    detail = await driver.apply("f1", fault, record)
    return json.loads(json.dumps(record)), detail


def _bit_distance(a: float, b: float) -> int:
    (x,) = struct.unpack("<Q", struct.pack("<d", a))
    (y,) = struct.unpack("<Q", struct.pack("<d", b))
    return bin(x ^ y).count("1")


async def test_sqlite_set_changes_only_the_filtered_keys_and_lists_them(
    driver: CorruptStateDriver, database: Path
) -> None:
    """Test that set writes the value into rows whose key matches the glob."""
    fault = CorruptStateFault(
        path=str(database), key_filter="user:*", mode="set", value=0
    )

    _, detail = await _inject(driver, fault)

    values = _values(database)
    assert values[("user:1", "a")] == values[("user:2", "a")] == 0
    assert values[("admin", "a")] == 9.0
    assert detail["changed"] == 3
    assert {c["old"] for c in detail["changes"]} == {4.0, 2.0, 7.0}


async def test_sqlite_scale_multiplies_the_values(
    driver: CorruptStateDriver, database: Path
) -> None:
    """Test that scale multiplies every selected value by the factor."""
    fault = CorruptStateFault(
        path=str(database), key_filter="admin", mode="scale", factor=-1
    )

    await _inject(driver, fault)

    assert _values(database)[("admin", "a")] == -9.0


async def test_sqlite_bitflip_flips_exactly_the_bits_asked_for(
    driver: CorruptStateDriver, database: Path
) -> None:
    """Test that bitflip with one bit changes one row by one bit of its double."""
    before = _values(database)
    fault = CorruptStateFault(path=str(database), mode="bitflip", bits=1, seed=7)

    _, detail = await _inject(driver, fault)

    after = _values(database)
    changed = [k for k in before if before[k] != after[k]]
    assert len(changed) == 1 and detail["changed"] == 1
    if after[changed[0]] is not None:  # a flip into NaN is stored as NULL
        assert _bit_distance(before[changed[0]], after[changed[0]]) == 1


async def test_restore_puts_back_the_snapshot_and_is_idempotent(
    driver: CorruptStateDriver, database: Path
) -> None:
    """Test that revert with restore brings every value back, twice safely."""
    before = _values(database)
    fault = CorruptStateFault(
        path=str(database), mode="bitflip", bits=64, seed=1, restore=True
    )
    record, _ = await _inject(driver, fault)
    assert _values(database) != before

    first = await driver.revert(record)
    second = await driver.revert(record)

    assert _values(database) == before
    assert first["restored"] >= 1
    assert second["restored"] == 0


async def test_restore_leaves_values_rewritten_since_the_fault(
    driver: CorruptStateDriver, database: Path
) -> None:
    """Test that a value the service rewrote after the fault is not clobbered."""
    fault = CorruptStateFault(
        path=str(database), key_filter="user:1", mode="set", value=0, restore=True
    )
    record, _ = await _inject(driver, fault)
    with sqlite3.connect(database) as db:
        db.execute(
            "UPDATE buckets SET consumed = 5 WHERE key = 'user:1' AND replica = 'a'"
        )

    reverted = await driver.revert(record)

    values = _values(database)
    assert values[("user:1", "a")] == 5
    assert values[("user:1", "b")] == 2.0
    assert reverted["left_alone"] == 1


async def test_without_restore_revert_changes_nothing_and_says_how_it_heals(
    driver: CorruptStateDriver, database: Path
) -> None:
    """Test that revert of a fault without restore is a no-op naming the healing."""
    fault = CorruptStateFault(path=str(database), mode="set", value=0)
    record, _ = await _inject(driver, fault)

    reverted = await driver.revert(record)

    assert set(_values(database).values()) == {0}
    assert "heals by gossip" in reverted["note"]


async def test_a_path_outside_the_allowed_state_paths_is_refused(
    driver: CorruptStateDriver, tmp_path: Path
) -> None:
    """Test that policy refuses files outside allowed_state_paths, touching nothing."""
    outside = tmp_path / "elsewhere.db"
    outside.write_bytes(b"precious")

    with pytest.raises(PolicyViolation, match="allowed_state_paths"):
        await driver.prepare("f1", CorruptStateFault(path=str(outside)))
    assert outside.read_bytes() == b"precious"


async def test_a_symlink_out_of_the_allowed_paths_is_refused(
    driver: CorruptStateDriver, tmp_path: Path, state_dir: Path
) -> None:
    """Test that a link inside an allowed path cannot lead outside of it."""
    outside = tmp_path / "elsewhere.db"
    outside.write_bytes(b"precious")
    (state_dir / "link.db").symlink_to(outside)

    with pytest.raises(PolicyViolation):
        driver.check(CorruptStateFault(path=str(state_dir / "link.db")))


async def test_a_missing_column_is_refused_with_the_columns_that_exist(
    driver: CorruptStateDriver, database: Path
) -> None:
    """Test that a wrong value column names the table's real columns."""
    fault = CorruptStateFault(path=str(database), value_column="tokens")

    with pytest.raises(FaultRejected, match="consumed"):
        await driver.prepare("f1", fault)


def test_sql_in_an_identifier_is_refused_by_the_wire_model() -> None:
    """Test that a table name carrying SQL never reaches the driver."""
    with pytest.raises(ValueError, match="table"):
        CorruptStateFault(path="/x", table="buckets; DROP TABLE buckets")


async def test_sql_in_the_key_filter_is_only_a_pattern(
    driver: CorruptStateDriver, database: Path
) -> None:
    """Test that the key filter is bound as a value: it matches and drops nothing."""
    fault = CorruptStateFault(
        path=str(database), key_filter="x'; DROP TABLE buckets;--"
    )

    with pytest.raises(FaultRejected, match="nothing"):
        await driver.prepare("f1", fault)
    assert len(_values(database)) == len(ROWS)


async def test_json_set_by_wildcard_path_and_restore(
    driver: CorruptStateDriver, state_dir: Path
) -> None:
    """Test that a dotted path with * selects every match and restore undoes it."""
    path = state_dir / "state.json"
    original = {"buckets": {"a": {"tokens": 5}, "b": {"tokens": 8}}, "v": 1}
    path.write_text(json.dumps(original))
    fault = CorruptStateFault(
        adapter="json",
        path=str(path),
        json_path="buckets.*.tokens",
        mode="set",
        value=-1,
        restore=True,
    )

    record, detail = await _inject(driver, fault)
    corrupted = json.loads(path.read_text())
    await driver.revert(record)

    assert corrupted["buckets"] == {"a": {"tokens": -1}, "b": {"tokens": -1}}
    assert detail["changed"] == 2
    assert json.loads(path.read_text()) == original


async def test_bytes_bitflip_flips_the_asked_bits_and_restore_undoes_them(
    driver: CorruptStateDriver, state_dir: Path
) -> None:
    """Test that bitflip on a byte range changes that many bits and no others."""
    path = state_dir / "blob.bin"
    original = bytes(range(256)) * 4
    path.write_bytes(original)
    fault = CorruptStateFault(
        adapter="bytes",
        path=str(path),
        offset_start=100,
        offset_end=200,
        bits=5,
        seed=3,
        restore=True,
    )

    record, _ = await _inject(driver, fault)
    corrupted = path.read_bytes()
    await driver.revert(record)

    differing = [
        i for i, (a, b) in enumerate(zip(original, corrupted, strict=True)) if a != b
    ]
    flipped = sum(bin(original[i] ^ corrupted[i]).count("1") for i in differing)
    assert all(100 <= i < 200 for i in differing)
    assert 1 <= flipped <= 5  # the same bit drawn twice flips back
    assert path.read_bytes() == original


async def test_a_byte_range_beyond_the_file_is_refused(
    driver: CorruptStateDriver, state_dir: Path
) -> None:
    """Test that offsets past the end of the file are refused, nothing written."""
    path = state_dir / "small.bin"
    path.write_bytes(b"abc")
    fault = CorruptStateFault(
        adapter="bytes", path=str(path), offset_start=0, offset_end=10
    )

    with pytest.raises(FaultRejected, match="outside"):
        await driver.prepare("f1", fault)
    assert path.read_bytes() == b"abc"


def test_scaling_bytes_is_refused(driver: CorruptStateDriver, state_dir: Path) -> None:
    """Test that the bytes adapter refuses scale with the modes it supports."""
    fault = CorruptStateFault(
        adapter="bytes", path=str(state_dir / "x"), mode="scale", factor=2
    )

    with pytest.raises(FaultRejected, match="bitflip or set"):
        driver.check(fault)


async def test_a_table_without_rowids_is_refused_with_the_reason(
    driver: CorruptStateDriver, state_dir: Path
) -> None:
    """Test that a WITHOUT ROWID table is refused by name, not with a SQL error."""
    path = state_dir / "norowid.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE buckets (key TEXT PRIMARY KEY, consumed REAL) WITHOUT ROWID"
        )
        db.execute("INSERT INTO buckets VALUES ('k', 1.0)")

    with pytest.raises(FaultRejected, match="WITHOUT ROWID"):
        await driver.prepare("f1", CorruptStateFault(path=str(path)))
