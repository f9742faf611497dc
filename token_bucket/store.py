"""A replica's local state: SQLite in WAL mode, read through on every request.

The table `buckets(key, replica, slot, consumed)` holds one row per counter
of the CRDT (see `token_bucket.crdt`). The replica keeps the rows in memory
and asks SQLite's `PRAGMA data_version` before serving: it changes exactly
when another connection (an operator, a chaos agent corrupting the state)
wrote to the file, and then the whole state is read again. So a change on
disk is what the replica serves next, at the cost of one cheap pragma per
request instead of a query.

`consumed` has no NOT NULL and no CHECK on purpose: the file is what chaos
experiments corrupt, and the service must survive whatever is in it. A file
SQLite cannot read at all is moved aside at start, and the replica starts
empty: its peers hold every counter, its own included.

A file corrupted underneath a running replica (raw bytes, not through
SQLite) may go unnoticed until the pages are read again: SQLite trusts its
page cache while the WAL index says nothing changed. The restart notices.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from token_bucket.crdt import State, is_valid_count

log = structlog.get_logger("token_bucket.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (
    key TEXT NOT NULL,
    replica TEXT NOT NULL,
    slot INTEGER NOT NULL,
    consumed REAL,
    PRIMARY KEY (key, replica, slot)
)
"""

UPSERT = """
INSERT INTO buckets (key, replica, slot, consumed) VALUES (?, ?, ?, ?)
ON CONFLICT (key, replica, slot) DO UPDATE SET consumed = excluded.consumed
"""

# A chaos agent holding the write lock briefly must not fail a request.
BUSY_TIMEOUT_MS = 2000


@dataclass(frozen=True)
class CorruptRow:
    """A row whose counter cannot be a valid count for its key."""

    key: str
    replica: str
    slot: int
    value: object


@dataclass
class Loaded:
    state: State
    corrupt: list[CorruptRow]


class Store:
    """The SQLite file of one replica."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Where an unreadable file was moved at start; None if it was fine.
        self.quarantined: Path | None = None
        try:
            self._db = _open(path)
        except sqlite3.DatabaseError as exc:
            # The counters are replicated: starting empty and taking them
            # back from the peers beats refusing to start. The broken file is
            # kept for the operator to look at.
            moved_to = self.quarantined = _quarantine(path)
            log.error(
                "state_file_unreadable",
                path=str(path),
                error=str(exc),
                moved_to=str(moved_to),
                action="started empty; peers restore the counters by gossip",
            )
            self._db = _open(path)
        self._data_version = self._read_data_version()

    def close(self) -> None:
        self._db.close()

    def changed_elsewhere(self) -> bool:
        """Whether another connection wrote to the file since the last call."""
        version = self._read_data_version()
        if version == self._data_version:
            return False
        self._data_version = version
        return True

    def load(self, capacity_of: Callable[[str], float]) -> Loaded:
        """Every row, split into valid counters and corrupt rows."""
        state: State = {}
        corrupt = []
        rows = self._db.execute("SELECT key, replica, slot, consumed FROM buckets")
        for key, replica, slot, value in rows:
            if not isinstance(slot, int) or not is_valid_count(value, capacity_of(key)):
                corrupt.append(CorruptRow(str(key), str(replica), slot, value))
                continue
            state.setdefault(key, {}).setdefault(replica, {})[slot] = float(value)
        self._data_version = self._read_data_version()
        return Loaded(state, corrupt)

    def write(self, counters: Iterable[tuple[str, str, int, float]]) -> None:
        """Upsert (key, replica, slot, consumed) counters in one transaction."""
        with self._transaction():
            self._db.executemany(UPSERT, counters)

    def delete_before(self, first_live: Iterable[tuple[str, int]]) -> None:
        """Delete each key's slots before its first live slot."""
        with self._transaction():
            self._db.executemany(
                "DELETE FROM buckets WHERE key = ? AND slot < ?", first_live
            )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _read_data_version(self) -> int:
        row = self._db.execute("PRAGMA data_version").fetchone()
        return int(row[0])


def _open(path: Path) -> sqlite3.Connection:
    """Connect, switch to WAL, create the table, and check the file is sane."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives a process crash; only a power loss may
        # lose the last commits, which peers give back through gossip.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute(SCHEMA)
        (verdict,) = db.execute("PRAGMA quick_check").fetchone()
        if verdict != "ok":
            msg = f"quick_check: {verdict}"
            raise sqlite3.DatabaseError(msg)
    except BaseException:
        db.close()
        raise
    return db


def _quarantine(path: Path) -> Path:
    """Move the file and its WAL and shared-memory files aside."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").rename(f"{target}{suffix}")
    return target


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
