"""A replica's local state: SQLite in WAL mode, read through on every request.

The table `buckets(key, replica, slot, consumed)` holds one row per counter
of the CRDT (see `token_bucket.crdt`). The replica keeps the rows in memory
and asks SQLite's `PRAGMA data_version` before serving: it changes exactly
when another connection (an operator, a chaos agent corrupting the state)
wrote to the file, and then the whole state is read again. So a change on
disk is what the replica serves next, at the cost of one cheap pragma per
request instead of a query.

`consumed` has no NOT NULL and no CHECK on purpose: the file is what chaos
experiments corrupt, and the service must survive whatever is in it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from token_bucket.crdt import State, is_valid_count

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
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives a process crash; only a power loss may
        # lose the last commits, which peers give back through gossip.
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute(SCHEMA)
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


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
