"""Signed operation: with trusted keys, only commands and lease renewals
signed by one of them are acted on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog

from chaos_agent import agent as agent_module
from chaos_agent import wire
from chaos_agent.agent import Agent
from chaos_agent.settings import SettingsError
from tests.unit.agent_fakes import (
    FakeClock,
    FakeNode,
    acks,
    control,
    inject,
    make_agent,
    send,
)


@pytest.fixture
def key(tmp_path: Path) -> wire.PrivateKey:
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
    tmp_path: Path, node: FakeNode, clock: FakeClock, key: wire.PrivateKey
) -> Agent:
    # `key` wrote the .pub this agent trusts.
    agent = make_agent(
        tmp_path / "state", node, clock, trust=[tmp_path / "keys" / "aftershock.pub"]
    )
    await agent.start()
    agent.outbox.drain()
    return agent


async def test_signed_command_is_applied(
    agent: Agent, key: wire.PrivateKey, clock: FakeClock
) -> None:
    """Test that a command signed by a trusted key is applied."""
    send(agent, wire.sign(inject(clock), key))
    await agent.idle()

    assert [a.state for a in acks(agent.outbox.drain())] == ["received", "applied"]


@pytest.mark.parametrize("forgery", ["unsigned", "other-key", "tampered"])
async def test_unauthentic_command_is_rejected(
    agent: Agent, node: FakeNode, key: wire.PrivateKey, clock: FakeClock, forgery: str
) -> None:
    """Test that unsigned, foreign-signed and altered commands are rejected
    with a reason and never reach the driver."""
    command = inject(clock)
    if forgery == "other-key":
        command = wire.sign(command, wire.generate_private_key())
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
    agent: Agent, key: wire.PrivateKey, clock: FakeClock
) -> None:
    """Test that a forged message reusing a genuine command's id does not make
    the genuine one look like a duplicate."""
    genuine = wire.sign(inject(clock), key)
    forged = wire.sign(genuine, wire.generate_private_key())

    send(agent, forged)
    send(agent, genuine)
    await agent.idle()

    assert [a.state for a in acks(agent.outbox.drain())] == [
        "rejected",
        "received",
        "applied",
    ]


async def test_unsigned_renewal_does_not_extend_the_lease(
    agent: Agent, key: wire.PrivateKey, clock: FakeClock
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
    agent: Agent, key: wire.PrivateKey, clock: FakeClock
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


def _halt(halted: bool, reason: str = "", *, at: datetime | None = None) -> wire.Halt:
    return wire.Halt(halted=halted, reason=reason, issued_at=at or datetime.now(UTC))


async def test_agent_without_trusted_key_refuses_to_exist(
    tmp_path: Path, node: FakeNode, clock: FakeClock
) -> None:
    """Test that an agent with no trusted key and no explicit insecure flag
    cannot be built, and the error says what to pass."""
    with pytest.raises(SettingsError, match="--insecure-allow-unsigned"):
        make_agent(tmp_path / "state", node, clock, insecure_allow_unsigned=False)


async def test_insecure_agent_warns_at_start(
    tmp_path: Path, node: FakeNode, clock: FakeClock
) -> None:
    """Test that an agent allowed to run unsigned says so at start, as a
    warning."""
    agent = make_agent(tmp_path / "state", node, clock, insecure_allow_unsigned=True)

    with structlog.testing.capture_logs() as logs:
        await agent.start()

    [warning] = [e for e in logs if e["event"] == "insecure_unsigned_commands_accepted"]
    assert warning["log_level"] == "warning"


async def test_unsigned_halt_is_honoured(
    agent: Agent, node: FakeNode, key: wire.PrivateKey, clock: FakeClock
) -> None:
    """Test that an unsigned halt still reverts every fault: a forged halt can
    only stop experiments."""
    send(agent, wire.sign(inject(clock), key))
    await agent.idle()
    agent.outbox.drain()

    agent.handle(wire.halt_topic(), wire.encode(_halt(True, "forged?")))
    await agent.idle()

    assert agent.halted
    assert [a.revert_cause for a in acks(agent.outbox.drain())] == ["halt"]
    assert node.applied == set()


@pytest.mark.parametrize("resume", ["unsigned", "other-key", "empty"])
async def test_unauthentic_resume_is_refused(
    agent: Agent, key: wire.PrivateKey, clock: FakeClock, resume: str
) -> None:
    """Test that an unsigned, foreign-signed or empty (deleted retained
    message) resume leaves the agent halted and refusing injects."""
    agent.handle(wire.halt_topic(), wire.encode(wire.sign(_halt(True, "stop"), key)))
    payload = {
        "unsigned": wire.encode(_halt(False)),
        "other-key": wire.encode(wire.sign(_halt(False), wire.generate_private_key())),
        "empty": b"",
    }[resume]

    agent.handle(wire.halt_topic(), payload)
    send(agent, wire.sign(inject(clock), key))
    await agent.idle()

    assert agent.halted
    refused = acks(agent.outbox.drain())[-1]
    assert (refused.state, "stop" in (refused.reason or "")) == ("rejected", True)


async def test_signed_resume_lifts_the_halt(
    agent: Agent, key: wire.PrivateKey, clock: FakeClock
) -> None:
    """Test that a resume signed by a trusted key lifts an unsigned halt."""
    agent.handle(wire.halt_topic(), wire.encode(_halt(True, "stop")))

    agent.handle(wire.halt_topic(), wire.encode(wire.sign(_halt(False), key)))
    send(agent, wire.sign(inject(clock), key))
    await agent.idle()

    assert not agent.halted
    assert acks(agent.outbox.drain())[-1].state == "applied"


async def test_replayed_old_resume_does_not_lift_a_newer_halt(
    agent: Agent, key: wire.PrivateKey
) -> None:
    """Test that a genuine resume recorded before a newer signed halt cannot
    be replayed to lift that halt."""
    now = datetime.now(UTC)
    old_resume = wire.sign(_halt(False, at=now - timedelta(minutes=10)), key)
    agent.handle(wire.halt_topic(), wire.encode(old_resume))
    agent.handle(wire.halt_topic(), wire.encode(wire.sign(_halt(True, at=now), key)))

    agent.handle(wire.halt_topic(), wire.encode(old_resume))

    assert agent.halted


async def test_halt_survives_a_reconnect(agent: Agent, key: wire.PrivateKey) -> None:
    """Test that with signatures a halt is kept across a broker reconnect
    (a deleted retained halt must not resume the agent)."""
    agent.handle(wire.halt_topic(), wire.encode(_halt(True, "stop")))

    agent.on_disconnected()
    agent.on_connected()

    assert agent.halted


async def _restarted(agent: Agent, node: FakeNode, clock: FakeClock) -> Agent:
    """A new agent on the same state directory and trusted keys."""
    again = make_agent(
        agent.settings.state_dir, node, clock, trust=agent.settings.trust
    )
    await again.start()
    again.outbox.drain()
    return again


async def test_halt_survives_an_agent_restart(
    agent: Agent, node: FakeNode, key: wire.PrivateKey, clock: FakeClock
) -> None:
    """Test that a restarted agent is still halted with no retained message
    (one deleted while it was away) and refuses injects, saying why."""
    agent.handle(wire.halt_topic(), wire.encode(wire.sign(_halt(True, "stop"), key)))

    again = await _restarted(agent, node, clock)
    send(again, wire.sign(inject(clock), key))
    await again.idle()

    assert again.halted and "stop" in again.halt_reason
    assert acks(again.outbox.drain())[-1].state == "rejected"
    assert node.applied == set()


async def test_restarted_agent_ignores_a_replayed_old_resume(
    agent: Agent, node: FakeNode, key: wire.PrivateKey, clock: FakeClock
) -> None:
    """Test that after a restart a genuine resume older than the newest halt
    is still a replay, while a newer signed resume lifts the halt for good."""
    now = datetime.now(UTC)
    old_resume = wire.sign(_halt(False, at=now - timedelta(minutes=10)), key)
    agent.handle(wire.halt_topic(), wire.encode(wire.sign(_halt(True, at=now), key)))

    again = await _restarted(agent, node, clock)
    again.handle(wire.halt_topic(), wire.encode(old_resume))
    still_halted = again.halted
    again.handle(wire.halt_topic(), wire.encode(wire.sign(_halt(False), key)))
    third = await _restarted(again, node, clock)

    assert (still_halted, again.halted, third.halted) == (True, False, False)


@pytest.mark.parametrize("content", [b"{not json", b'{"halts": 3}', b"\xff\xfe"])
async def test_unreadable_halt_memory_starts_halted_until_resumed(
    tmp_path: Path,
    node: FakeNode,
    key: wire.PrivateKey,
    clock: FakeClock,
    content: bytes,
) -> None:
    """Test that a damaged halts.json makes the agent start halted (the safe
    side), naming the file, and a signed resume lifts that halt."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "halts.json").write_bytes(content)
    agent = make_agent(state, node, clock, trust=[tmp_path / "keys" / "aftershock.pub"])

    await agent.start()
    reason = agent.halt_reason
    agent.handle(wire.halt_topic(), wire.encode(wire.sign(_halt(False), key)))

    assert "halts.json" in reason
    assert not agent.halted


async def test_halt_of_a_former_site_is_not_recalled(
    agent: Agent, node: FakeNode, key: wire.PrivateKey, clock: FakeClock
) -> None:
    """Test that an agent restarted on the same state directory under another
    site does not inherit its old site's halt, which it could never resume."""
    site_halt = wire.encode(wire.sign(_halt(True, "site freeze"), key))
    agent.handle(wire.halt_topic(agent.site), site_halt)

    moved = make_agent(
        agent.settings.state_dir,
        node,
        clock,
        trust=agent.settings.trust,
        site="elsewhere",
    )
    await moved.start()

    assert agent.halted
    assert not moved.halted


async def test_unsigned_agent_keeps_no_halt_memory(
    tmp_path: Path, node: FakeNode, clock: FakeClock
) -> None:
    """Test that an agent without keys writes no halts.json: its halts last
    only as long as the broker's retained message."""
    agent = make_agent(tmp_path / "state", node, clock)
    await agent.start()

    agent.handle(wire.halt_topic(), wire.encode(_halt(True, "stop")))

    assert agent.halted
    assert not (tmp_path / "state" / "halts.json").exists()


async def test_full_replay_cache_refuses_new_commands(
    agent: Agent,
    key: wire.PrivateKey,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that once the replay cache holds its limit of unexpired ids, a new
    command is rejected (saying why) and the old ids are still refused as
    replays; once they expire, commands are accepted again."""
    monkeypatch.setattr(agent_module, "SEEN_LIMIT", 2)
    first, second, third = (wire.sign(control(clock, "ping"), key) for _ in range(3))
    send(agent, first)
    send(agent, second)
    agent.outbox.drain()

    send(agent, third)
    send(agent, first)

    [refused] = acks(agent.outbox.drain())
    assert (refused.command_id, refused.state) == (third.id, "rejected")
    assert "replay cache is full" in (refused.reason or "")

    clock.advance(61)
    fresh = wire.sign(control(clock, "ping"), key)
    send(agent, fresh)
    assert acks(agent.outbox.drain())[-1].state == "applied"


async def test_clock_skew_allowance_is_a_setting(
    tmp_path: Path, node: FakeNode, clock: FakeClock, key: wire.PrivateKey
) -> None:
    """Test that `max_clock_skew_s` moves the line for commands from the
    future: 20 s ahead passes the default 30 s and fails at 5 s."""
    pub = tmp_path / "keys" / "aftershock.pub"
    ahead = clock.now() + timedelta(seconds=20)
    command = wire.sign(
        wire.Command(
            issued_at=ahead,
            expires_at=ahead + timedelta(seconds=60),
            experiment="exp1",
            action="ping",
        ),
        key,
    )
    answers = []
    for skew in (30.0, 5.0):
        agent = make_agent(
            tmp_path / f"state-{skew}", node, clock, trust=[pub], max_clock_skew_s=skew
        )
        send(agent, command)
        answers.append(acks(agent.outbox.drain())[-1].state)

    assert answers == ["applied", "rejected"]


async def test_replayed_old_renewal_does_not_extend_the_lease(
    tmp_path: Path, node: FakeNode, key: wire.PrivateKey, clock: FakeClock
) -> None:
    """Test that a genuine renewal recorded earlier and replayed after its own
    lease (plus the clock skew allowance, 1 s here) is ignored, so the fault
    still ends with its lease."""
    agent = make_agent(
        tmp_path / "state",
        node,
        clock,
        trust=[tmp_path / "keys" / "aftershock.pub"],
        max_clock_skew_s=1,
    )
    await agent.start()
    send(agent, wire.sign(inject(clock, duration_s=300, lease_s=10), key))
    await agent.idle()
    agent.outbox.drain()
    recorded = wire.sign(
        wire.LeaseRenewal(experiment="exp1", lease_s=10, issued_at=clock.now()), key
    )

    clock.advance(9)
    agent.handle(wire.lease_topic("exp1"), wire.encode(recorded))  # still fresh
    clock.advance(9)
    agent.handle(wire.lease_topic("exp1"), wire.encode(recorded))  # 18 s old
    clock.advance(2)
    agent.enforce_deadlines()
    await agent.idle()

    assert [a.revert_cause for a in acks(agent.outbox.drain())] == ["lease"]
