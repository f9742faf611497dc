"""The safety invariants on a fake clock: duration, lease, halt, journal,
shutdown, retried reverts, and reverts that wait for a running apply."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from chaos_agent import agent as agent_module
from chaos_agent import wire
from chaos_agent.agent import Agent
from chaos_agent.journal import Journal, JournalEntry
from tests.unit.agent_fakes import (
    SITE,
    FakeClock,
    FakeNode,
    acks,
    inject,
    journal_files,
    make_agent,
    send,
    statuses,
)


async def applied(agent: Agent, command: wire.Command) -> None:
    send(agent, command)
    await agent.idle()
    assert acks(agent.outbox.drain())[-1].state == "applied"


async def tick(agent: Agent) -> list[wire.Ack]:
    agent.enforce_deadlines()
    await agent.idle()
    return acks(agent.outbox.drain())


def lease(experiment: str, lease_s: float) -> bytes:
    return wire.encode(wire.LeaseRenewal(experiment=experiment, lease_s=lease_s))


def halt(halted: bool, reason: str = "") -> bytes:
    return wire.encode(wire.Halt(halted=halted, reason=reason))


async def test_fault_is_reverted_when_duration_ends(
    agent: Agent, node: FakeNode, clock: FakeClock
) -> None:
    """Test that a fault stays until its duration and is then reverted with
    cause `duration`, leaving the journal empty."""
    command = inject(clock, duration_s=30, lease_s=60)
    await applied(agent, command)

    clock.advance(29)
    assert await tick(agent) == []
    clock.advance(1)
    (ack,) = await tick(agent)

    assert (ack.state, ack.revert_cause, ack.fault_id) == (
        "reverted",
        "duration",
        command.id,
    )
    assert node.applied == set()
    assert journal_files(agent.settings.state_dir) == []


async def test_fault_is_reverted_when_lease_lapses(
    agent: Agent, node: FakeNode, clock: FakeClock
) -> None:
    """Test that without renewals a fault is reverted when its lease, started
    at apply time, runs out."""
    await applied(agent, inject(clock, duration_s=300, lease_s=10))

    clock.advance(10)
    (ack,) = await tick(agent)

    assert (ack.state, ack.revert_cause) == ("reverted", "lease")
    assert node.applied == set()


async def test_renewal_extends_the_lease(
    agent: Agent, node: FakeNode, clock: FakeClock
) -> None:
    """Test that a renewal for the fault's experiment moves its lease deadline
    to now + lease_s, and a renewal for another experiment does not."""
    command = inject(clock, duration_s=300, lease_s=10, experiment="exp1")
    await applied(agent, command)

    clock.advance(8)
    agent.handle(wire.lease_topic("exp1"), lease("exp1", 10))
    agent.handle(wire.lease_topic("other"), lease("other", 100))
    clock.advance(8)
    assert await tick(agent) == []
    assert node.applied == {str(command.id)}

    clock.advance(2)
    (ack,) = await tick(agent)
    assert ack.revert_cause == "lease"


async def test_renewal_republishes_the_status_with_the_new_lease(
    agent: Agent, clock: FakeClock
) -> None:
    """Test that a renewal publishes a retained status whose fault shows the
    moved lease deadline, and a renewal for another experiment publishes
    nothing."""
    await applied(agent, inject(clock, duration_s=300, lease_s=10))
    agent.outbox.drain()

    clock.advance(8)
    agent.handle(wire.lease_topic("other"), lease("other", 100))
    unrelated = statuses(agent.outbox.drain())
    agent.handle(wire.lease_topic("exp1"), lease("exp1", 10))
    (status,) = statuses(agent.outbox.drain())

    assert unrelated == []
    (fault,) = status.faults
    assert fault.lease_expires_at is not None
    assert abs((fault.lease_expires_at - clock.now()).total_seconds() - 10) < 0.01


async def test_halt_reverts_and_refuses_until_resumed(
    agent: Agent, node: FakeNode, clock: FakeClock
) -> None:
    """Test that a halt reverts every fault (cause `halt`), refuses injects
    with a reason that quotes the halt, and a resume lets injects through."""
    await applied(agent, inject(clock))

    agent.handle(wire.halt_topic(), halt(True, "game day over"))
    await agent.idle()
    sent = agent.outbox.drain()
    assert [(a.state, a.revert_cause) for a in acks(sent)] == [("reverted", "halt")]
    assert statuses(sent)[-1].halted
    assert node.applied == set()

    send(agent, inject(clock))
    await agent.idle()
    refused = acks(agent.outbox.drain())[-1]
    assert refused.state == "rejected"
    assert "game day over" in (refused.reason or "")

    agent.handle(wire.halt_topic(), halt(False))
    await applied(agent, inject(clock))


async def test_site_halt_cleared_by_empty_retained_message(
    agent: Agent, clock: FakeClock
) -> None:
    """Test that an empty payload on a halt topic (a cleared retained message)
    ends that halt."""
    agent.handle(wire.halt_topic(SITE), halt(True, "maintenance"))
    assert agent.halted

    agent.handle(wire.halt_topic(SITE), b"")

    assert not agent.halted
    await applied(agent, inject(clock))


async def test_unreadable_halt_counts_as_halt(agent: Agent) -> None:
    """Test that garbage on a halt topic halts the agent (the safe side)."""
    agent.handle(wire.halt_topic(), b"{garbage")

    assert agent.halted
    assert "unreadable" in agent.halt_reason


async def test_start_reverts_journal_leftovers(
    tmp_path: Path, node: FakeNode, clock: FakeClock
) -> None:
    """Test that start() reverts what a killed agent left in the journal,
    empties the journal, and queues a reverted(startup) ack, all before the
    agent has handled any message."""
    fault_id = uuid.uuid4()
    node.applied.add(str(fault_id))
    journal = Journal(tmp_path / "journal")
    journal.open()
    journal.write(
        JournalEntry(
            fault_id=fault_id,
            fault_type="cpu",
            experiment="exp1",
            state="applied",
            record={"fault_id": str(fault_id)},
            written_at=datetime.now(UTC),
        )
    )
    agent = make_agent(tmp_path, node, clock)

    await agent.start()

    assert node.applied == set()
    assert node.events == [("revert", str(fault_id))]
    assert journal.entries() == []
    (ack,) = acks(agent.outbox.drain())
    assert (ack.state, ack.revert_cause, ack.fault_id) == (
        "reverted",
        "startup",
        fault_id,
    )


async def test_shutdown_reverts_everything(
    agent: Agent, node: FakeNode, clock: FakeClock
) -> None:
    """Test that shutdown reverts every fault with cause `shutdown` and then
    refuses new injects."""
    await applied(agent, inject(clock))
    await applied(agent, inject(clock, experiment="exp2"))

    await agent.shutdown()
    sent = acks(agent.outbox.drain())
    assert [(a.state, a.revert_cause) for a in sent] == [("reverted", "shutdown")] * 2
    assert node.applied == set()

    send(agent, inject(clock))
    await agent.idle()
    assert "shutting down" in (acks(agent.outbox.drain())[-1].reason or "")


async def test_revert_is_retried_then_reported_stuck(
    agent: Agent, node: FakeNode, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that a revert that raises is retried, that after the last attempt
    the fault is reported failed and stays in the journal, and that a revert
    which fails only once succeeds on retry."""
    monkeypatch.setattr(agent_module, "REVERT_RETRY_S", 0.0)
    stuck = inject(clock, duration_s=5, lease_s=5)
    await applied(agent, stuck)

    node.revert_failures = agent_module.REVERT_ATTEMPTS
    clock.advance(5)
    (ack,) = await tick(agent)
    assert ack.state == "failed"
    assert "device busy" in (ack.reason or "")
    assert [e["fault_id"] for e in journal_files(agent.settings.state_dir)] == [
        str(stuck.id)
    ]

    node.revert_failures = 1
    await agent.shutdown()
    (ack,) = acks(agent.outbox.drain())
    assert (ack.state, ack.revert_cause) == ("reverted", "shutdown")
    assert journal_files(agent.settings.state_dir) == []


async def test_revert_waits_for_a_running_apply(
    agent: Agent, node: FakeNode, clock: FakeClock
) -> None:
    """Test that a halt arriving while a fault is being applied reverts it
    once the apply is done, and the fault is never left applied."""
    node.apply_gate = asyncio.Event()
    command = inject(clock)
    send(agent, command)
    await asyncio.sleep(0)
    agent.handle(wire.halt_topic(), halt(True, "abort"))

    node.apply_gate.set()
    await agent.idle()

    states = [(a.state, a.revert_cause) for a in acks(agent.outbox.drain())]
    assert states == [("received", None), ("applied", None), ("reverted", "halt")]
    assert node.applied == set()


async def test_status_lists_active_faults(agent: Agent, clock: FakeClock) -> None:
    """Test that the retained status lists each applied fault with its
    deadlines, and drops it once reverted."""
    command = inject(clock, duration_s=30, lease_s=10)
    send(agent, command)
    await agent.idle()
    (status,) = statuses(agent.outbox.drain())
    (active,) = status.faults
    assert active.fault_id == command.id
    assert (active.expires_at - active.applied_at).total_seconds() == pytest.approx(30)
    assert (
        active.lease_expires_at - active.applied_at
    ).total_seconds() == pytest.approx(10)

    clock.advance(30)
    await tick(agent)
    assert agent.status().faults == []


async def test_metrics_follow_the_fault(agent: Agent, clock: FakeClock) -> None:
    """Test that the active gauge, the applied and reverted counters and the
    revert histogram move with a fault's lifecycle."""
    registry = agent.metrics.registry
    await applied(agent, inject(clock, duration_s=5, lease_s=5))
    assert (
        registry.get_sample_value("aftershock_agent_faults_active", {"type": "cpu"})
        == 1
    )

    clock.advance(5)
    await tick(agent)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("aftershock_agent_faults_active", type="cpu") == 0
    assert value("aftershock_agent_faults_applied_total", type="cpu") == 1
    assert (
        value("aftershock_agent_faults_reverted_total", type="cpu", cause="duration")
        == 1
    )
    assert value("aftershock_agent_revert_seconds_count", type="cpu") == 1
