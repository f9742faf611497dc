"""Corrupt-state faults: change a service's local state on disk, on purpose.

Parameters: an adapter that knows the file's shape, a selection within it, and
a mode of corruption.

- `sqlite`: rows of `table` whose `key_column` matches the `key_filter` glob
  (SQLite GLOB: `*`, `?`, `[...]`, case-sensitive), at most `max_rows`; the
  `value_column` is corrupted. Table and column names come only from the
  validated wire fields and are quoted; values are bound, never formatted.
- `json`: the values at `json_path`, a dotted path where `*` matches every key
  (or list index) at one level; `key_filter` is matched against the dotted
  path of each value found.
- `bytes`: the bytes `[offset_start, offset_end)` of any file.

Modes: `bitflip` flips `bits` random bits (of the IEEE 754 double, the 64-bit
integer, the text's or blob's bytes) across the selection; `set` writes
`value` (bytes: fills the range with that byte); `scale` multiplies numbers
by `factor` (not for bytes). `seed` makes the choice of bits repeatable.

Only files under `policy.allowed_state_paths` are touched. Prepare records the
selection and apply, before it writes anything, snapshots each value it is
about to change (old and new) into a file under the agent's state directory.
Revert restores the snapshot only when the fault asked for `restore`, and then
only values still as the fault left them: a value the service has rewritten
since (a gossip merge, a new take) is newer than both and is left alone.
Without `restore`, revert is a no-op and the corruption heals the way the
service heals it (gossip, a moving window) -- which is the experiment.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import math
import os
import random
import sqlite3
import struct
from pathlib import Path
from typing import Any, Final

from chaos_agent.faults.base import (
    Availability,
    FaultDriver,
    FaultFailed,
    FaultRejected,
    Record,
)
from chaos_agent.wire import CorruptStateFault

# Changes listed in an ack; the snapshot file holds all of them.
DETAIL_CAP: Final = 20
# A `set` over a byte range snapshots every byte of it.
MAX_BYTE_RANGE: Final = 1024 * 1024
BUSY_TIMEOUT_MS: Final = 5000
NOT_RESTORED: Final = (
    "not restored: heals by gossip (lowered counters come back through the "
    "max-merge) or as the window moves on (raised counters age out)"
)


class CorruptStateDriver(FaultDriver[CorruptStateFault]):
    type = "corrupt-state"

    async def available(self) -> Availability:
        roots = [str(p) for p in self.context.policy.allowed_state_paths]
        if not roots:
            return Availability(
                ok=False,
                reason="no allowed_state_paths in this agent's policy; add the "
                "directories whose files experiments may corrupt",
            )
        return Availability(ok=True, facts={"allowed_state_paths": roots})

    # ---------------------------------------------------------- parameters

    def check(self, fault: CorruptStateFault) -> None:
        self.context.policy.check_state_path(Path(fault.path))
        if fault.adapter == "json" and not fault.json_path:
            msg = "the json adapter needs json_path, e.g. 'buckets.*.consumed'"
            raise FaultRejected(msg)
        if fault.adapter == "bytes":
            _check_bytes_fault(fault)
        if fault.mode == "scale" and not math.isfinite(fault.factor or 0.0):
            msg = f"factor must be a finite number, not {fault.factor!r}"
            raise FaultRejected(msg)

    # ------------------------------------------------------------- prepare

    async def prepare(self, fault_id: str, fault: CorruptStateFault) -> Record:
        """Select what will be corrupted; the snapshot is written by apply."""
        # Files and SQLite locks block: keep them off the agent's event loop.
        return await asyncio.to_thread(self._prepare, fault_id, fault)

    def _prepare(self, fault_id: str, fault: CorruptStateFault) -> Record:
        self.check(fault)
        path = self.context.policy.check_state_path(Path(fault.path))
        if not path.is_file():
            msg = f"state file {str(path)!r} does not exist"
            raise FaultRejected(msg)

        rng = random.Random(fault.seed)
        if fault.adapter == "sqlite":
            targets = _sqlite_select(path, fault, rng)
        elif fault.adapter == "json":
            targets = _json_select(path, fault, rng)
        else:
            targets = _bytes_select(path, fault, rng)
        if not targets:
            msg = f"nothing in {str(path)!r} matches the selection; nothing to corrupt"
            raise FaultRejected(msg)

        snapshot = self.context.state_dir / "corrupt-state" / f"{fault_id}.json"
        return {
            "adapter": fault.adapter,
            "path": str(path),
            "table": fault.table,
            "value_column": fault.value_column,
            "restore": fault.restore,
            "snapshot": str(snapshot),
            "targets": targets,
        }

    # --------------------------------------------------------------- apply

    async def apply(
        self, fault_id: str, fault: CorruptStateFault, record: Record
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self._apply, fault, record)

    def _apply(self, fault: CorruptStateFault, record: Record) -> dict[str, Any]:
        snapshot = Path(record["snapshot"])
        path = Path(record["path"])
        try:
            if fault.adapter == "sqlite":
                changes = _sqlite_corrupt(path, fault, record["targets"], snapshot)
            elif fault.adapter == "json":
                changes = _json_corrupt(path, fault, record["targets"], snapshot)
            else:
                changes = _bytes_corrupt(path, fault, record["targets"], snapshot)
        except (OSError, sqlite3.Error, ValueError) as exc:
            msg = f"corrupting {str(path)!r} failed: {exc}"
            raise FaultFailed(msg) from exc
        if not changes:
            msg = f"every selected value of {str(path)!r} vanished before the fault"
            raise FaultFailed(msg)

        self.context.log.info(
            "fault_applied",
            fault="corrupt-state",
            adapter=fault.adapter,
            mode=fault.mode,
            path=str(path),
            changed=len(changes),
        )
        return {
            "adapter": fault.adapter,
            "mode": fault.mode,
            "path": str(path),
            "changed": len(changes),
            "changes": [_for_ack(c) for c in changes[:DETAIL_CAP]],
            "truncated": len(changes) > DETAIL_CAP,
            "restore": fault.restore,
            "heals": "restored on revert" if fault.restore else NOT_RESTORED,
        }

    # -------------------------------------------------------------- revert

    async def revert(self, record: Record) -> dict[str, Any]:
        return await asyncio.to_thread(self._revert, record)

    def _revert(self, record: Record) -> dict[str, Any]:
        snapshot = Path(record["snapshot"])
        if not record.get("restore"):
            with contextlib.suppress(FileNotFoundError):
                snapshot.unlink()
            return {"restored": 0, "note": NOT_RESTORED}
        try:
            changes = json.loads(snapshot.read_text())["changes"]
        except FileNotFoundError:
            # Apply never wrote anything, or an earlier revert finished.
            return {"restored": 0, "note": "no snapshot left: nothing to restore"}

        path = Path(record["path"])
        if not path.exists():
            return {"restored": 0, "note": f"{path} is gone; nothing to restore"}
        if record["adapter"] == "sqlite":
            restored = _sqlite_restore(path, record, changes)
        elif record["adapter"] == "json":
            restored = _json_restore(path, changes)
        else:
            restored = _bytes_restore(path, changes)
        snapshot.unlink(missing_ok=True)

        left_alone = len(changes) - restored
        self.context.log.info(
            "fault_reverted",
            fault="corrupt-state",
            path=str(path),
            restored=restored,
            left_alone=left_alone,
        )
        return {
            "restored": restored,
            "left_alone": left_alone,
            "note": "values rewritten since the fault are newer and were left alone",
        }


# ------------------------------------------------------------------ values


def _encode(value: object) -> dict[str, Any]:
    """A SQLite or JSON value as JSON, keeping its type (blobs as hex)."""
    if value is None:
        return {"type": "null", "value": None}
    if isinstance(value, bool):
        return {"type": "bool", "value": value}
    if isinstance(value, int):
        return {"type": "integer", "value": value}
    if isinstance(value, float):
        return {"type": "real", "value": value}
    if isinstance(value, bytes):
        return {"type": "blob", "value": value.hex()}
    return {"type": "text", "value": str(value)}


def _decode(encoded: dict[str, Any]) -> object:
    if encoded["type"] == "blob":
        return bytes.fromhex(encoded["value"])
    return encoded["value"]


def _flip(value: object, bit: int) -> object:
    """`value` with one bit flipped in its natural binary form."""
    if isinstance(value, float):
        (raw,) = struct.unpack("<Q", struct.pack("<d", value))
        (flipped,) = struct.unpack("<d", struct.pack("<Q", raw ^ (1 << (bit % 64))))
        return float(flipped)
    if isinstance(value, int) and not isinstance(value, bool):
        (raw,) = struct.unpack("<Q", struct.pack("<q", _wrap64(value)))
        (flipped,) = struct.unpack("<q", struct.pack("<Q", raw ^ (1 << (bit % 64))))
        return int(flipped)
    data = bytearray(value if isinstance(value, bytes) else str(value).encode())
    if not data:
        return value
    index = (bit // 8) % len(data)
    data[index] ^= 1 << (bit % 8)
    if isinstance(value, bytes):
        return bytes(data)
    try:
        return data.decode()
    except UnicodeDecodeError:
        # The flip broke the UTF-8: keep the broken bytes, as a disk would.
        return bytes(data)


def _wrap64(value: int) -> int:
    return (value + 2**63) % 2**64 - 2**63


def _bits_in(value: object) -> int:
    if isinstance(value, int | float):
        return 64
    size = len(value) if isinstance(value, bytes) else len(str(value).encode())
    return 8 * size


def _corrupted(value: object, fault: CorruptStateFault, bits: list[int]) -> object:
    """The new value for `value` under the fault's mode, or `value` if none."""
    if fault.mode == "set":
        return fault.value
    if fault.mode == "scale":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value * (fault.factor or 0.0)
        return value
    for bit in bits:
        value = _flip(value, bit)
    return value


def _spread_bits(
    candidates: list[dict[str, Any]], fault: CorruptStateFault, rng: random.Random
) -> list[dict[str, Any]]:
    """For bitflip: pick `bits` random bits across the candidates' values."""
    if fault.mode != "bitflip":
        return candidates
    chosen: dict[int, list[int]] = {}
    for _ in range(fault.bits):
        index = rng.randrange(len(candidates))
        width = _bits_in(_decode(candidates[index]["old"]))
        chosen.setdefault(index, []).append(rng.randrange(max(width, 1)))
    return [{**candidates[i], "bits": bits} for i, bits in sorted(chosen.items())]


def _write_snapshot(snapshot: Path, changes: list[dict[str, Any]]) -> None:
    """Write the changes durably before the state file is touched."""
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    temporary = snapshot.with_name(snapshot.name + ".tmp")
    with temporary.open("w") as out:
        json.dump({"changes": changes}, out)
        out.flush()
        os.fsync(out.fileno())
    temporary.replace(snapshot)


def _for_ack(change: dict[str, Any]) -> dict[str, Any]:
    where = change.get("key", change.get("offset"))
    return {"at": where, "old": change["old"]["value"], "new": change["new"]["value"]}


# ------------------------------------------------------------------ sqlite


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _connect(path: Path) -> sqlite3.Connection:
    # mode=rw: never create a database where the operator named none.
    db = sqlite3.connect(path.as_uri() + "?mode=rw", uri=True, isolation_level=None)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return db


def _sqlite_select(
    path: Path, fault: CorruptStateFault, rng: random.Random
) -> list[dict[str, Any]]:
    table, key, value = (
        _quote(fault.table),
        _quote(fault.key_column),
        _quote(fault.value_column),
    )
    db = _connect(path)
    try:
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if not columns:
            msg = f"{str(path)!r} has no table {fault.table!r}"
            raise FaultRejected(msg)
        missing = {fault.key_column, fault.value_column} - columns
        if missing:
            msg = (
                f"table {fault.table!r} has no column {', '.join(sorted(missing))} "
                f"(it has: {', '.join(sorted(columns))})"
            )
            raise FaultRejected(msg)
        rows = db.execute(
            f"SELECT rowid, {key}, {value} FROM {table} "
            f"WHERE CAST({key} AS TEXT) GLOB ? AND {value} IS NOT NULL "
            "ORDER BY rowid LIMIT ?",
            (fault.key_filter, fault.max_rows),
        ).fetchall()
    except sqlite3.Error as exc:
        msg = f"cannot read {str(path)!r} as SQLite: {exc}"
        if "rowid" in str(exc):
            # Rows are found again at apply and revert by rowid.
            msg = (
                f"table {fault.table!r} is WITHOUT ROWID; "
                "the sqlite adapter needs rowids"
            )
        raise FaultRejected(msg) from None
    finally:
        db.close()

    candidates = [
        {"rowid": rowid, "key": str(k), "old": _encode(v)} for rowid, k, v in rows
    ]
    return _spread_bits(candidates, fault, rng) if candidates else []


def _sqlite_corrupt(
    path: Path,
    fault: CorruptStateFault,
    targets: list[dict[str, Any]],
    snapshot: Path,
) -> list[dict[str, Any]]:
    table, value = _quote(fault.table), _quote(fault.value_column)
    db = _connect(path)
    try:
        db.execute("BEGIN IMMEDIATE")
        planned = []
        for target in targets:
            row = db.execute(
                f"SELECT {value} FROM {table} WHERE rowid = ?", (target["rowid"],)
            ).fetchone()
            if row is None:
                continue
            new = _corrupted(row[0], fault, target.get("bits", []))
            planned.append((target, row[0], new))

        changes = []
        for target, old, new in planned:
            db.execute(
                f"UPDATE {table} SET {value} = ? WHERE rowid = ?",
                (new, target["rowid"]),
            )
            # Read back what SQLite stored: NaN becomes NULL, text may coerce.
            (stored,) = db.execute(
                f"SELECT {value} FROM {table} WHERE rowid = ?", (target["rowid"],)
            ).fetchone()
            changes.append(
                {
                    "rowid": target["rowid"],
                    "key": target["key"],
                    "old": _encode(old),
                    "new": _encode(stored),
                }
            )
        # The snapshot is durable before the transaction commits.
        _write_snapshot(snapshot, changes)
        db.execute("COMMIT")
        return changes
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        db.close()


def _sqlite_restore(path: Path, record: Record, changes: list[dict[str, Any]]) -> int:
    table, value = _quote(record["table"]), _quote(record["value_column"])
    db = _connect(path)
    restored = 0
    try:
        db.execute("BEGIN IMMEDIATE")
        for change in changes:
            cursor = db.execute(
                f"UPDATE {table} SET {value} = ? WHERE rowid = ? AND {value} IS ?",
                (_decode(change["old"]), change["rowid"], _decode(change["new"])),
            )
            restored += cursor.rowcount
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        db.close()
    return restored


# -------------------------------------------------------------------- json

Location = list[str | int]


def _json_select(
    path: Path, fault: CorruptStateFault, rng: random.Random
) -> list[dict[str, Any]]:
    document = _read_json(path)
    assert fault.json_path is not None, "check() requires json_path"
    found = _json_find(document, fault.json_path.split("."), [])
    candidates = []
    for location, value in found:
        dotted = ".".join(str(part) for part in location)
        if not fnmatch.fnmatchcase(dotted, fault.key_filter):
            continue
        if fault.mode != "set" and not _is_number(value):
            continue
        candidates.append({"location": location, "key": dotted, "old": _encode(value)})
        if len(candidates) >= fault.max_rows:
            break
    return _spread_bits(candidates, fault, rng) if candidates else []


def _json_find(
    node: object, parts: list[str], at: Location
) -> list[tuple[Location, object]]:
    if not parts:
        return [(at, node)]
    head, rest = parts[0], parts[1:]
    children: list[tuple[str | int, object]] = []
    if isinstance(node, dict):
        keys = list(node) if head == "*" else [head] if head in node else []
        children = [(k, node[k]) for k in keys]
    elif isinstance(node, list):
        if head == "*":
            children = list(enumerate(node))
        elif head.isdigit() and int(head) < len(node):
            children = [(int(head), node[int(head)])]
    found = []
    for step, child in children:
        found += _json_find(child, rest, [*at, step])
    return found


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        msg = f"cannot read {str(path)!r} as JSON: {exc}"
        raise FaultRejected(msg) from None


def _json_at(document: Any, location: Location) -> Any:
    for step in location:
        document = document[step]
    return document


def _json_set(document: Any, location: Location, value: object) -> None:
    parent = _json_at(document, location[:-1])
    parent[location[-1]] = value


def _write_json(path: Path, document: Any) -> None:
    temporary = path.with_name(path.name + ".aftershock.tmp")
    temporary.write_text(json.dumps(document))
    os.chmod(temporary, path.stat().st_mode & 0o7777)
    temporary.replace(path)


def _json_corrupt(
    path: Path,
    fault: CorruptStateFault,
    targets: list[dict[str, Any]],
    snapshot: Path,
) -> list[dict[str, Any]]:
    document = json.loads(path.read_text())
    changes = []
    for target in targets:
        try:
            old = _json_at(document, target["location"])
        except (KeyError, IndexError, TypeError):
            continue
        new = _corrupted(old, fault, target.get("bits", []))
        if isinstance(new, bytes):
            new = new.decode(errors="replace")
        _json_set(document, target["location"], new)
        changes.append({**target, "old": _encode(old), "new": _encode(new)})
    _write_snapshot(snapshot, changes)
    _write_json(path, document)
    return changes


def _json_restore(path: Path, changes: list[dict[str, Any]]) -> int:
    document = json.loads(path.read_text())
    restored = 0
    for change in changes:
        try:
            current = _json_at(document, change["location"])
        except (KeyError, IndexError, TypeError):
            continue
        if _same(current, _decode(change["new"])):
            _json_set(document, change["location"], _decode(change["old"]))
            restored += 1
    if restored:
        _write_json(path, document)
    return restored


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b and type(a) is type(b)


# ------------------------------------------------------------------- bytes


def _check_bytes_fault(fault: CorruptStateFault) -> None:
    if fault.offset_end is not None and fault.offset_end <= fault.offset_start:
        msg = "offset_end must be greater than offset_start"
        raise FaultRejected(msg)
    if fault.mode == "scale":
        msg = "the bytes adapter cannot scale; use bitflip or set"
        raise FaultRejected(msg)
    if fault.mode == "set" and (
        fault.value is None
        or not fault.value.is_integer()
        or not 0 <= fault.value <= 255
    ):
        msg = "the bytes adapter sets a byte: value must be a whole number 0-255"
        raise FaultRejected(msg)


def _bytes_range(path: Path, fault: CorruptStateFault) -> range:
    size = path.stat().st_size
    end = size if fault.offset_end is None else fault.offset_end
    if end > size or fault.offset_start >= end:
        msg = (
            f"byte range [{fault.offset_start}, {end}) is outside "
            f"{str(path)!r} ({size} bytes)"
        )
        raise FaultRejected(msg)
    return range(fault.offset_start, end)


def _bytes_select(
    path: Path, fault: CorruptStateFault, rng: random.Random
) -> list[dict[str, Any]]:
    span = _bytes_range(path, fault)
    if fault.mode == "set":
        if len(span) > MAX_BYTE_RANGE:
            msg = f"a set over more than {MAX_BYTE_RANGE} bytes is refused"
            raise FaultRejected(msg)
        return [{"offset": offset, "bits": []} for offset in span]

    chosen: dict[int, list[int]] = {}
    for _ in range(fault.bits):
        offset = span[rng.randrange(len(span))]
        chosen.setdefault(offset, []).append(rng.randrange(8))
    return [{"offset": offset, "bits": bits} for offset, bits in sorted(chosen.items())]


def _bytes_corrupt(
    path: Path,
    fault: CorruptStateFault,
    targets: list[dict[str, Any]],
    snapshot: Path,
) -> list[dict[str, Any]]:
    with path.open("r+b") as file:
        changes = []
        for target in targets:
            file.seek(target["offset"])
            current = file.read(1)
            if not current:
                continue
            old = current[0]
            new = int(fault.value or 0) if fault.mode == "set" else old
            for bit in target["bits"]:
                new ^= 1 << bit
            changes.append(
                {
                    "offset": target["offset"],
                    "old": _encode(old),
                    "new": _encode(new),
                }
            )
        _write_snapshot(snapshot, changes)
        for change in changes:
            file.seek(change["offset"])
            file.write(bytes([change["new"]["value"]]))
        file.flush()
        os.fsync(file.fileno())
    return changes


def _bytes_restore(path: Path, changes: list[dict[str, Any]]) -> int:
    restored = 0
    with path.open("r+b") as file:
        for change in changes:
            file.seek(change["offset"])
            current = file.read(1)
            if current and current[0] == change["new"]["value"]:
                file.seek(change["offset"])
                file.write(bytes([change["old"]["value"]]))
                restored += 1
        file.flush()
        os.fsync(file.fileno())
    return restored
