"""Crash-safe record of the faults this agent has applied.

One JSON file per fault in `<state_dir>/journal/`, written before the driver
changes anything (state `prepared`) and again after apply (state `applied`),
removed once the fault is reverted. Each write goes to a temporary file that
is fsynced and renamed over the old one, and the directory is fsynced, so a
crash at any instant leaves either the old entry or the new one, never half
of either.

At start the agent reverts every entry it finds before it subscribes to
commands: whatever a killed agent left behind is undone first.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import structlog

from chaos_agent.faults.base import Record

log = structlog.get_logger("chaos_agent.journal")

EntryState = Literal["prepared", "applied"]


class JournalError(OSError):
    """The journal cannot be written: the agent must not apply faults."""


@dataclass
class JournalEntry:
    """What reverting one fault needs, as written to disk."""

    fault_id: uuid.UUID
    fault_type: str
    experiment: str
    state: EntryState
    record: Record
    written_at: datetime
    # The fault's wire spec, for people reading the journal; revert uses
    # only `record`.
    fault: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "fault_id": str(self.fault_id),
            "fault_type": self.fault_type,
            "experiment": self.experiment,
            "state": self.state,
            "record": self.record,
            "written_at": self.written_at.isoformat(),
            "fault": self.fault,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JournalEntry:
        return cls(
            fault_id=uuid.UUID(data["fault_id"]),
            fault_type=str(data["fault_type"]),
            experiment=str(data["experiment"]),
            state=data["state"],
            record=dict(data["record"]),
            written_at=datetime.fromisoformat(data["written_at"]),
            fault=dict(data.get("fault", {})),
        )


class Journal:
    """The directory of journal entries, one file per fault id."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def open(self) -> None:
        """Create the directory, or raise JournalError saying how to fix it."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe = self.directory / ".writable"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            msg = (
                f"journal directory {self.directory} is not writable ({exc.strerror}); "
                "point --state-dir at a directory this agent may write"
            )
            raise JournalError(msg) from None

    def path(self, fault_id: uuid.UUID) -> Path:
        return self.directory / f"{fault_id}.json"

    def write(self, entry: JournalEntry) -> None:
        """Replace the entry for `entry.fault_id` durably."""
        target = self.path(entry.fault_id)
        data = json.dumps(entry.to_json(), sort_keys=True, default=str).encode()
        try:
            write_durably(target, data)
        except OSError as exc:
            msg = f"cannot write journal entry {target}: {exc.strerror}"
            raise JournalError(msg) from None

    def remove(self, fault_id: uuid.UUID) -> None:
        """Drop the entry; an entry already gone is fine."""
        try:
            self.path(fault_id).unlink()
        except FileNotFoundError:
            return
        sync_directory(self.directory)

    def entries(self) -> list[JournalEntry]:
        """Every readable entry, oldest first.

        An unreadable file is renamed to `*.corrupt` and logged as an error:
        the agent cannot revert what it cannot read, so an operator must look.
        """
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                found.append(JournalEntry.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                aside = path.with_suffix(".corrupt")
                path.replace(aside)
                log.error("journal_entry_unreadable", path=str(aside), error=str(exc))
        # Temporary files are writes that a crash interrupted before the
        # rename; the entry they would have replaced (if any) is still there.
        for stale in self.directory.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        return sorted(found, key=lambda entry: entry.written_at)


def write_durably(target: Path, data: bytes) -> None:
    """Replace `target` with `data` so that a crash at any instant leaves the
    old content or the new, never half: a temporary file, fsynced, renamed
    over the target, then the directory fsynced. Raises OSError."""
    temporary = target.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, target)
    sync_directory(target.parent)


def sync_directory(directory: Path) -> None:
    # A rename or unlink is durable only once the directory is on disk.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
