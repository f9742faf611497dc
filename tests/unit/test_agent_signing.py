"""Signed operation: with trusted keys, only commands and lease renewals
signed by one of them are acted on."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from chaos_agent import wire
from chaos_agent.agent import Agent
from tests.unit.agent_fakes import (
    FakeClock,
    FakeNode,
    acks,
    inject,
    make_agent,
    send,
)


@pytest.fixture
def key(tmp_path: Path) -> Ed25519PrivateKey:
    private_path, _ = wire.generate_key_pair(tmp_path / "keys")
    return wire.load_private_key(private_path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def node() -> FakeNode:
    return FakeNode()


@pytest.fixture
async def agent(
    tmp_path: Path, node: FakeNode, clock: FakeClock, key: Ed25519PrivateKey
) -> Agent:
    # `key` wrote the .pub this agent trusts.
    agent = make_agent(
        tmp_path / "state", node, clock, trust=[tmp_path / "keys" / "aftershock.pub"]
    )
    await agent.start()
    agent.outbox.drain()
    return agent


async def test_signed_command_is_applied(
    agent: Agent, key: Ed25519PrivateKey, clock: FakeClock
) -> None:
    """Test that a command signed by a trusted key is applied."""
    send(agent, wire.sign(inject(clock), key))
    await agent.idle()

    assert [a.state for a in acks(agent.outbox.drain())] == ["received", "applied"]


@pytest.mark.parametrize("forgery", ["unsigned", "other-key", "tampered"])
async def test_unauthentic_command_is_rejected(
    agent: Agent, node: FakeNode, key: Ed25519PrivateKey, clock: FakeClock, forgery: str
) -> None:
    """Test that unsigned, foreign-signed and altered commands are rejected
    with a reason and never reach the driver."""
    command = inject(clock)
    if forgery == "other-key":
        command = wire.sign(command, Ed25519PrivateKey.generate())
    elif forgery == "tampered":
        signed = wire.sign(command, key)
        command = signed.model_copy(update={"duration_s": 600.0})

    send(agent, command)
    await agent.idle()

    (ack,) = acks(agent.outbox.drain())
    assert ack.state == "rejected"
    assert "sign" in (ack.reason or "")
    assert node.events == []


async def test_forged_copy_does_not_block_the_genuine_command(
    agent: Agent, key: Ed25519PrivateKey, clock: FakeClock
) -> None:
    """Test that a forged message reusing a genuine command's id does not make
    the genuine one look like a duplicate."""
    genuine = wire.sign(inject(clock), key)
    forged = wire.sign(genuine, Ed25519PrivateKey.generate())

    send(agent, forged)
    send(agent, genuine)
    await agent.idle()

    assert [a.state for a in acks(agent.outbox.drain())] == [
        "rejected",
        "received",
        "applied",
    ]


async def test_unsigned_renewal_does_not_extend_the_lease(
    agent: Agent, key: Ed25519PrivateKey, clock: FakeClock
) -> None:
    """Test that an unsigned lease renewal is ignored and a signed one counts."""
    send(agent, wire.sign(inject(clock, duration_s=300, lease_s=10), key))
    await agent.idle()
    agent.outbox.drain()

    clock.advance(8)
    unsigned = wire.LeaseRenewal(experiment="exp1", lease_s=10)
    agent.handle(wire.lease_topic("exp1"), wire.encode(unsigned))
    clock.advance(3)
    agent.enforce_deadlines()
    await agent.idle()
    assert [a.revert_cause for a in acks(agent.outbox.drain())] == ["lease"]


async def test_command_from_the_future_is_rejected(
    agent: Agent, key: Ed25519PrivateKey, clock: FakeClock
) -> None:
    """Test that a command issued well after the agent's now is rejected
    (clock skew beyond the allowance)."""
    now = clock.now() + timedelta(minutes=5)
    command = wire.Command(
        issued_at=now,
        expires_at=now + timedelta(seconds=60),
        experiment="exp1",
        action="ping",
    )
    send(agent, wire.sign(command, key))

    assert "future" in (acks(agent.outbox.drain())[-1].reason or "")
