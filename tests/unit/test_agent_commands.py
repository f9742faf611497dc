"""Command handling: decoding, targeting, admission, actions and their acks."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from chaos_agent import wire
from chaos_agent.agent import Agent
from tests.unit.agent_fakes import (
    NODE,
    SITE,
    FakeClock,
    FakeNode,
    acks,
    control,
    inject,
    journal_files,
    make_agent,
    send,
    states,
)


async def test_inject_is_applied_and_acked(agent: Agent, node: FakeNode) -> None:
    """Test that an inject goes received -> applied with the driver's detail,
    and that the journal holds the applied record."""
    command = inject(agent.clock)  # type: ignore[arg-type]
    send(agent, command)
    await agent.idle()

    sent = acks(agent.outbox.drain())
    assert [a.state for a in sent] == ["received", "applied"]
    assert sent[1].fault_id == command.id
    assert sent[1].detail == {"verified": True}
    assert sent[1].timings.elapsed_ms >= 0
    assert node.applied == {str(command.id)}
    (entry,) = journal_files(agent.settings.state_dir)
    assert entry["state"] == "applied"
    assert entry["record"] == {"fault_id": str(command.id)}


async def test_duplicate_command_is_applied_once(agent: Agent, node: FakeNode) -> None:
    """Test that a redelivered command (same id) is neither applied nor acked
    a second time."""
    command = inject(agent.clock)  # type: ignore[arg-type]
    send(agent, command)
    send(agent, command)
    await agent.idle()

    assert states(agent.outbox.drain()) == ["received", "applied"]
    assert [e for e in node.events if e[0] == "apply"] == [("apply", str(command.id))]


async def test_expired_command_is_rejected(
    agent: Agent, node: FakeNode, clock: FakeClock
) -> None:
    """Test that a command past its expires_at is rejected and nothing runs."""
    command = inject(clock, expires_in_s=5)
    clock.advance(6)
    send(agent, command)
    await agent.idle()

    sent = acks(agent.outbox.drain())
    assert [a.state for a in sent] == ["received", "rejected"]
    assert "expired" in (sent[1].reason or "")
    assert node.events == []


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"{not json", "invalid Command"),
        (json.dumps({"id": "not-a-uuid"}).encode(), "invalid Command"),
        (b"x" * (wire.MAX_PAYLOAD_BYTES + 1), "exceeds"),
        # Found by the fuzz test: reading the id for the ack hit the
        # recursion limit, so this went unanswered.
        (b"[" * 30_000, "recursion limit"),
    ],
    ids=["garbage", "missing-fields", "oversized", "deeply-nested"],
)
async def test_malformed_payload_is_rejected(
    agent: Agent, node: FakeNode, payload: bytes, expected: str
) -> None:
    """Test that an unreadable command gets a rejected ack with the decoding
    error and no command id, and the agent keeps working."""
    agent.handle(wire.command_topic(SITE, NODE), payload)

    (ack,) = acks(agent.outbox.drain())
    assert ack.state == "rejected"
    assert ack.command_id is None
    assert expected in (ack.reason or "")
    assert node.events == []


async def test_malformed_command_with_readable_id_keeps_it(agent: Agent) -> None:
    """Test that the rejected ack of an invalid command carries its id when the
    id itself can be read, so the sender can match it."""
    command_id = uuid.uuid4()
    payload = json.dumps({"id": str(command_id), "action": "explode"}).encode()
    agent.handle(wire.command_topic(SITE, NODE), payload)

    (ack,) = acks(agent.outbox.drain())
    assert (ack.state, ack.command_id) == ("rejected", command_id)


async def test_broadcast_for_other_agents_is_ignored(
    agent: Agent, clock: FakeClock
) -> None:
    """Test that a broadcast command whose target excludes this agent gets no
    ack at all."""
    command = inject(clock, target=wire.Target(nodes=["someone-else"]))
    send(agent, command, topic=wire.command_topic())
    await agent.idle()

    assert acks(agent.outbox.drain()) == []


async def test_mismatched_target_on_own_topic_is_rejected(
    agent: Agent, clock: FakeClock
) -> None:
    """Test that a command sent to this node's topic but targeting labels it
    does not have is rejected, saying so."""
    command = inject(clock, target=wire.Target(labels={"zone": "nowhere"}))
    send(agent, command)

    (ack,) = acks(agent.outbox.drain())
    assert ack.state == "rejected"
    assert "does not match" in (ack.reason or "")


async def test_broadcast_matching_labels_is_applied(
    tmp_path: Path, node: FakeNode, clock: FakeClock
) -> None:
    """Test that a site broadcast selecting this agent's labels is applied."""
    agent = make_agent(tmp_path, node, clock, labels={"zone": "a"})
    await agent.start()
    agent.outbox.drain()
    command = inject(clock, target=wire.Target(labels={"zone": "a"}))
    send(agent, command, topic=wire.command_topic(SITE))
    await agent.idle()

    assert states(agent.outbox.drain()) == ["received", "applied"]


async def test_duration_over_policy_is_rejected(
    tmp_path: Path, node: FakeNode, clock: FakeClock
) -> None:
    """Test that a fault longer than the policy's max_duration_s is rejected
    with a reason naming the cap, before the driver is touched."""
    agent = make_agent(tmp_path, node, clock, policy={"max_duration_s": 60})
    await agent.start()
    agent.outbox.drain()
    send(agent, inject(clock, duration_s=120))
    await agent.idle()

    sent = acks(agent.outbox.drain())
    assert [a.state for a in sent] == ["received", "rejected"]
    assert "max_duration_s" in (sent[1].reason or "")
    assert node.events == []
    assert journal_files(tmp_path) == []


async def test_fault_type_outside_policy_is_rejected(
    tmp_path: Path, node: FakeNode, clock: FakeClock
) -> None:
    """Test that a fault type missing from allowed_faults is rejected."""
    agent = make_agent(tmp_path, node, clock, policy={"allowed_faults": ["memory"]})
    await agent.start()
    agent.outbox.drain()
    send(agent, inject(clock))

    assert "allowed_faults" in (acks(agent.outbox.drain())[1].reason or "")


async def test_driver_check_rejects(agent: Agent, node: FakeNode) -> None:
    """Test that a fault the driver's check refuses is rejected with its text."""
    node.reject_with = "no cgroup controller for cpu"
    send(agent, inject(agent.clock))  # type: ignore[arg-type]
    await agent.idle()

    sent = acks(agent.outbox.drain())
    assert sent[-1].state == "rejected"
    assert sent[-1].reason == "no cgroup controller for cpu"
    assert node.events == []


async def test_failed_apply_is_reverted_and_reported(
    agent: Agent, node: FakeNode
) -> None:
    """Test that an apply that raises answers failed, reverts what the record
    covers and leaves nothing in the journal."""
    node.fail_apply = True
    command = inject(agent.clock)  # type: ignore[arg-type]
    send(agent, command)
    await agent.idle()

    sent = acks(agent.outbox.drain())
    assert [a.state for a in sent] == ["received", "failed"]
    assert "stressor exited" in (sent[1].reason or "")
    assert node.applied == set()
    assert ("revert", str(command.id)) in node.events
    assert journal_files(agent.settings.state_dir) == []
    assert agent.faults == []


async def test_revert_command_reverts_the_fault(agent: Agent, node: FakeNode) -> None:
    """Test that a revert command reverts the named fault with cause
    `command`, acked under the revert command's id."""
    injected = inject(agent.clock)  # type: ignore[arg-type]
    send(agent, injected)
    await agent.idle()
    revert = control(agent.clock, "revert", fault_id=injected.id)  # type: ignore[arg-type]
    send(agent, revert)
    await agent.idle()

    sent = [a for a in acks(agent.outbox.drain()) if a.command_id == revert.id]
    assert [a.state for a in sent] == ["received", "reverted"]
    assert sent[1].revert_cause == "command"
    assert sent[1].fault_id == injected.id
    assert node.applied == set()
    assert journal_files(agent.settings.state_dir) == []


async def test_revert_of_unknown_fault_is_rejected(agent: Agent) -> None:
    """Test that reverting a fault this agent does not hold is rejected."""
    send(agent, control(agent.clock, "revert", fault_id=uuid.uuid4()))  # type: ignore[arg-type]

    assert acks(agent.outbox.drain())[-1].state == "rejected"


async def test_revert_all_reverts_every_fault(agent: Agent, node: FakeNode) -> None:
    """Test that revert_all reverts every fault and ends with a summary ack
    listing them."""
    first, second = inject(agent.clock), inject(agent.clock, experiment="exp2")  # type: ignore[arg-type]
    send(agent, first)
    send(agent, second)
    await agent.idle()
    command = control(agent.clock, "revert_all")  # type: ignore[arg-type]
    send(agent, command)
    await agent.idle()

    sent = [a for a in acks(agent.outbox.drain()) if a.command_id == command.id]
    assert [a.state for a in sent] == ["received", "reverted", "reverted", "reverted"]
    assert set(sent[-1].detail["faults"]) == {str(first.id), str(second.id)}
    assert node.applied == set()


async def test_ping_answers_pong(agent: Agent) -> None:
    """Test that a ping is answered received -> applied with a pong."""
    command = control(agent.clock, "ping")  # type: ignore[arg-type]
    send(agent, command)

    sent = acks(agent.outbox.drain())
    assert [a.state for a in sent] == ["received", "applied"]
    assert sent[1].detail["pong"] is True


async def test_overlong_validity_is_rejected(agent: Agent, clock: FakeClock) -> None:
    """Test that a command valid for longer than the protocol allows is
    rejected (a replay window of hours is not accepted)."""
    command = wire.Command(
        issued_at=clock.now(),
        expires_at=clock.now() + timedelta(hours=2),
        experiment="exp1",
        action="ping",
    )
    send(agent, command)

    assert "valid for" in (acks(agent.outbox.drain())[-1].reason or "")
