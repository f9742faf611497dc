"""The journal: durable entries, atomic replacement, unreadable files set aside."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from chaos_agent.journal import Journal, JournalEntry, JournalError


def entry(state: str = "prepared", age_s: float = 0.0) -> JournalEntry:
    return JournalEntry(
        fault_id=uuid.uuid4(),
        fault_type="cpu",
        experiment="exp1",
        state=state,  # type: ignore[arg-type]
        record={"cgroup": "aftershock/x", "pids": [123]},
        written_at=datetime.now(UTC) - timedelta(seconds=age_s),
        fault={"type": "cpu", "load_percent": 50},
    )


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    journal = Journal(tmp_path / "journal")
    journal.open()
    return journal


def test_written_entry_reads_back_equal(journal: Journal) -> None:
    """Test that an entry written is read back with every field intact."""
    written = entry()
    journal.write(written)

    assert journal.entries() == [written]


def test_rewrite_replaces_the_entry(journal: Journal) -> None:
    """Test that writing the same fault again replaces its entry, leaving one file."""
    first = entry()
    journal.write(first)
    first.state = "applied"
    first.record["pids"] = [123, 124]
    journal.write(first)

    (only,) = journal.entries()
    assert only.state == "applied"
    assert only.record["pids"] == [123, 124]
    assert len(list(journal.directory.iterdir())) == 1


def test_remove_is_idempotent(journal: Journal) -> None:
    """Test that removing an entry twice, or one never written, is not an error."""
    written = entry()
    journal.write(written)

    journal.remove(written.fault_id)
    journal.remove(written.fault_id)
    journal.remove(uuid.uuid4())

    assert journal.entries() == []


def test_entries_come_oldest_first(journal: Journal) -> None:
    """Test that entries are returned in the order they were written."""
    newer, older = entry(age_s=1), entry(age_s=60)
    journal.write(newer)
    journal.write(older)

    assert [e.fault_id for e in journal.entries()] == [older.fault_id, newer.fault_id]


def test_unreadable_entry_is_set_aside(journal: Journal) -> None:
    """Test that a corrupt file is renamed *.corrupt and the readable ones survive."""
    good = entry()
    journal.write(good)
    (journal.directory / f"{uuid.uuid4()}.json").write_text("{not json")

    assert journal.entries() == [good]
    assert len(list(journal.directory.glob("*.corrupt"))) == 1


def test_interrupted_write_leaves_the_old_entry(journal: Journal) -> None:
    """Test that a temporary file left by a crash mid-write is discarded and the
    previous entry is what the journal holds."""
    written = entry()
    journal.write(written)
    journal.path(written.fault_id).with_suffix(".tmp").write_text('{"half": ')

    assert journal.entries() == [written]
    assert not list(journal.directory.glob("*.tmp"))


def test_unwritable_directory_is_refused(tmp_path: Path) -> None:
    """Test that a journal under a file (not a directory) fails with a hint."""
    blocker = tmp_path / "file"
    blocker.write_text("")

    with pytest.raises(JournalError, match="--state-dir"):
        Journal(blocker / "journal").open()
