"""Fakes for unit tests of the agent's orchestration: a driver that records
what it was asked to do, and a clock that moves only when told."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from chaos_agent import wire
from chaos_agent.agent import Agent, Outgoing
from chaos_agent.faults.base import (
    Availability,
    FaultContext,
    FaultDriver,
    FaultFailed,
    FaultRejected,
    Record,
)
from chaos_agent.settings import AgentSettings

SITE = "lab"
NODE = "edge-1"


class FakeClock:
    """Both clocks advance together, and only through `advance`."""

    def __init__(self) -> None:
        self._wall = datetime.now(UTC)
        self._monotonic = 1000.0

    def monotonic(self) -> float:
        return self._monotonic

    def now(self) -> datetime:
        return self._wall

    def advance(self, seconds: float) -> None:
        self._monotonic += seconds
        self._wall += timedelta(seconds=seconds)


@dataclass
class FakeNode:
    """What the fake drivers did to the 'node', and how they should misbehave."""

    applied: set[str] = field(default_factory=set)
    events: list[tuple[str, str]] = field(default_factory=list)
    reject_with: str | None = None
    fail_apply: bool = False
    revert_failures: int = 0
    apply_gate: asyncio.Event | None = None


class FakeDriver(FaultDriver[Any]):
    type = "fake"

    def __init__(self, context: FaultContext, node: FakeNode) -> None:
        super().__init__(context)
        self.node = node

    async def available(self) -> Availability:
        return Availability(True, facts={"fake": True})

    def check(self, fault: Any) -> None:
        if self.node.reject_with:
            raise FaultRejected(self.node.reject_with)

    async def prepare(self, fault_id: str, fault: Any) -> Record:
        self.node.events.append(("prepare", fault_id))
        return {"fault_id": fault_id}

    async def apply(self, fault_id: str, fault: Any, record: Record) -> dict[str, Any]:
        self.node.events.append(("apply", fault_id))
        if self.node.apply_gate is not None:
            await self.node.apply_gate.wait()
        self.node.applied.add(fault_id)
        if self.node.fail_apply:
            msg = "stressor exited at once"
            raise FaultFailed(msg)
        return {"verified": True}

    async def revert(self, record: Record) -> dict[str, Any]:
        fault_id = str(record["fault_id"])
        self.node.events.append(("revert", fault_id))
        if self.node.revert_failures > 0:
            self.node.revert_failures -= 1
            msg = "device busy"
            raise OSError(msg)
        self.node.applied.discard(fault_id)
        return {"was_applied": True}


def make_agent(
    state_dir: Path, node: FakeNode, clock: FakeClock, **settings: Any
) -> Agent:
    # Tests about something other than signing run unsigned; signing tests
    # pass `trust`.
    settings.setdefault("insecure_allow_unsigned", "trust" not in settings)
    settings.setdefault("node", NODE)
    settings.setdefault("site", SITE)
    config = AgentSettings(state_dir=state_dir, metrics_listen=None, **settings)
    return Agent(
        config,
        driver_factory=lambda fault_type, context: FakeDriver(context, node),
        clock=clock,
    )


def inject(
    clock: FakeClock,
    *,
    duration_s: float = 30.0,
    lease_s: float = 10.0,
    experiment: str = "exp1",
    target: wire.Target | None = None,
    expires_in_s: float = 60.0,
) -> wire.Command:
    return wire.Command(
        issued_at=clock.now(),
        expires_at=clock.now() + timedelta(seconds=expires_in_s),
        experiment=experiment,
        action="inject",
        target=target or wire.Target(),
        fault=wire.CpuFault(load_percent=50),
        duration_s=duration_s,
        lease_s=lease_s,
    )


def control(clock: FakeClock, action: str, **fields: Any) -> wire.Command:
    return wire.Command(
        issued_at=clock.now(),
        expires_at=clock.now() + timedelta(seconds=60),
        experiment=fields.pop("experiment", "exp1"),
        action=action,
        **fields,
    )


def own_topic() -> str:
    return wire.command_topic(SITE, NODE)


def send(agent: Agent, command: wire.Command, topic: str | None = None) -> None:
    agent.handle(topic or own_topic(), wire.encode(command))


def acks(messages: list[Outgoing]) -> list[wire.Ack]:
    topic = wire.ack_topic(SITE, NODE)
    return [wire.decode(wire.Ack, m.payload) for m in messages if m.topic == topic]


def statuses(messages: list[Outgoing]) -> list[wire.Status]:
    topic = wire.status_topic(SITE, NODE)
    return [wire.decode(wire.Status, m.payload) for m in messages if m.topic == topic]


def states(messages: list[Outgoing], command_id: uuid.UUID | None = None) -> list[str]:
    return [
        a.state
        for a in acks(messages)
        if command_id is None or a.command_id == command_id
    ]


def journal_files(state_dir: Path) -> list[dict[str, Any]]:
    return [
        json.loads(p.read_text())
        for p in sorted((state_dir / "journal").glob("*.json"))
    ]
