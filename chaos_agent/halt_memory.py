"""What a signed agent remembers of halts across its own restarts.

With trusted keys, a halt is lifted only by a signed resume that is no older
than the newest authentic halt message on its topic. Both facts, the halts in
force and the newest `issued_at` per halt topic, live in memory; this module
keeps them in `<state_dir>/halts.json` too, so that a restarted agent is still
halted and still refuses an older genuine resume put back as the retained
message (a broker-level attacker can replace retained messages; only the
coordinator's key can sign a newer resume).

The file is written like a journal entry (`write_durably`), and
only by agents with trusted keys: unsigned agents forget halts on every
reconnect anyway (see `Agent.on_connected`). A file that cannot be read is
reported and read as a global halt: refusing faults is the safe side, and a
signed `aftershock resume` lifts it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from chaos_agent import wire
from chaos_agent.journal import write_durably

log = structlog.get_logger("chaos_agent.halt_memory")

FILE_NAME = "halts.json"


@dataclass
class HaltMemory:
    """Halts in force per topic, and the newest authentic `issued_at` seen on
    each halt topic."""

    halts: dict[str, wire.Halt] = field(default_factory=dict)
    newest: dict[str, datetime] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "halts": {t: wire.encode(h).decode() for t, h in self.halts.items()},
            "newest": {t: at.isoformat() for t, at in self.newest.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HaltMemory:
        return cls(
            halts={t: wire.decode(wire.Halt, h) for t, h in data["halts"].items()},
            newest={t: datetime.fromisoformat(at) for t, at in data["newest"].items()},
        )


def load(state_dir: Path) -> HaltMemory:
    """The memory a previous run left, empty when there is none; an
    unreadable file yields a global halt that a signed resume lifts."""
    path = state_dir / FILE_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return HaltMemory()
    except OSError as exc:
        return _unreadable(path, str(exc))

    try:
        return HaltMemory.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return _unreadable(path, str(exc))


def _unreadable(path: Path, error: str) -> HaltMemory:
    log.error(
        "halt_memory_unreadable",
        path=str(path),
        error=error,
        hint="the agent starts halted; `aftershock resume` lifts it",
    )
    reason = f"halt memory {path} unreadable ({error}); resume to lift"
    return HaltMemory(halts={wire.halt_topic(): wire.Halt(halted=True, reason=reason)})


def save(state_dir: Path, memory: HaltMemory) -> None:
    """Write `memory` atomically; raises OSError when the disk refuses."""
    state_dir.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(memory.to_json(), sort_keys=True).encode()
    write_durably(state_dir / FILE_NAME, payload)
