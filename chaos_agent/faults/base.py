"""The interface every fault kind implements.

A driver reads top to bottom as: check (parameters and policy, no side
effects), prepare (what revert will need, written to the journal before
anything changes), apply and verify, revert. The agent owns the lifecycle
around it: duration, lease, halt, journal and acks.

Revert is idempotent: "already gone" is success, so the agent may call it
after a crash, twice, or for a fault whose apply failed half-way.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import structlog

from chaos_agent.policy import Policy

F = TypeVar("F")

# A journal record: plain JSON, everything revert needs, nothing more.
Record = dict[str, Any]


class FaultRejected(Exception):
    """The fault cannot run here (policy, capability, bad parameters).

    Raised before anything changes; the agent answers with a rejected ack.
    """


class FaultFailed(Exception):
    """Applying the fault went wrong after it started; the agent reverts
    whatever the record covers and answers with a failed ack."""


@dataclass(frozen=True)
class FaultContext:
    """What a driver may know about the agent that runs it."""

    policy: Policy
    state_dir: Path
    # Name under which the agent creates its cgroups (`<root>/<fault id>`).
    cgroup_root: str = "aftershock"
    # Broker address, so network faults can exempt the agent's own channel.
    broker_host: str | None = None
    broker_port: int | None = None
    agent_pid: int = field(default_factory=os.getpid)
    log: structlog.stdlib.BoundLogger = field(
        default_factory=lambda: structlog.get_logger("chaos_agent.fault")
    )


@dataclass(frozen=True)
class Availability:
    """Whether a fault kind works on this node, and if not, how to get it."""

    ok: bool
    reason: str = ""
    facts: dict[str, Any] = field(default_factory=dict)


class FaultDriver(ABC, Generic[F]):
    """Apply/revert pair for one fault type (`F` is its wire model)."""

    type: ClassVar[str]

    def __init__(self, context: FaultContext) -> None:
        self.context = context

    @abstractmethod
    async def available(self) -> Availability:
        """Probe the node once: can this fault kind be applied here?"""

    @abstractmethod
    def check(self, fault: F) -> None:
        """Validate `fault` against policy and capabilities; raise
        FaultRejected or PolicyViolation. No side effects."""

    @abstractmethod
    async def prepare(self, fault_id: str, fault: F) -> Record:
        """Return what revert needs (names, handles, snapshots of what will be
        replaced). The agent journals it durably before calling apply."""

    @abstractmethod
    async def apply(self, fault_id: str, fault: F, record: Record) -> dict[str, Any]:
        """Apply the fault, verify it took effect, and return what was verified
        for the applied ack. May add to `record`; the agent journals it again.
        Raise FaultFailed on error (the agent then reverts the record)."""

    @abstractmethod
    async def revert(self, record: Record) -> dict[str, Any]:
        """Undo the fault described by `record`. Idempotent: what is already
        gone counts as reverted. Returns facts for the reverted ack."""
