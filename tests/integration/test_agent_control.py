"""A real agent process answering what it must refuse: halts retained before
it connects, malformed and out-of-policy commands; and what it reports:
status, telemetry, /metrics, /healthz."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from chaos_agent import wire
from tests.agent_process import (
    AgentProcess,
    command,
    mqtt_client,
    retained_status,
    signed,
    started_agent,
)
from tests.brokers import Broker

pytestmark = [pytest.mark.integration, pytest.mark.root]

CPU = wire.CpuFault(load_percent=5, workers=1)


async def publish_retained(broker: Broker, topic: str, payload: bytes) -> None:
    async with mqtt_client(broker.url) as client:
        await client.publish(topic, payload, qos=1, retain=True)


async def _halted(agent: AgentProcess, broker: Broker) -> wire.Status:
    """The agent's retained status once it says halted (or after 5 s)."""
    status = await agent.wait_online()
    for _ in range(50):
        if status.halted:
            break
        await asyncio.sleep(0.1)
        status = await retained_status(broker.url, agent.site, agent.node) or status
    return status


async def test_retained_halt_before_connect_refuses_faults(
    broker: Broker, tmp_path: Path
) -> None:
    """Test that an agent starting under a retained halt reports itself halted
    and rejects injects with the halt's reason, and accepts them once the halt
    is cleared."""
    halt = wire.Halt(halted=True, reason="change freeze")
    await publish_retained(broker, wire.halt_topic(), wire.encode(halt))

    async with started_agent(broker.url, tmp_path) as agent:
        # The halt may land just after the first status.
        status = await _halted(agent, broker)
        assert status.halted
        assert "change freeze" in status.halt_reason

        acks = await agent.send(command(fault=CPU))
        assert acks[-1].state == "rejected"
        assert "change freeze" in (acks[-1].reason or "")

        resume = signed(wire.Halt(halted=False))
        await publish_retained(broker, wire.halt_topic(), wire.encode(resume))
        await asyncio.sleep(0.5)
        acks = await agent.send(command(fault=CPU, duration_s=1))
        assert acks[-1].state == "applied"


async def test_signed_halt_outlives_sigkill_and_a_deleted_retained_halt(
    broker: Broker, tmp_path: Path
) -> None:
    """Test that a signed agent halted, SIGKILLed, and restarted after the
    retained halt was deleted is still halted and refuses injects; that an
    older genuine resume put back as the retained message does not lift the
    halt; and that a new signed resume does."""
    old_resume = signed(wire.Halt(halted=False))
    await asyncio.sleep(0.01)  # the halt must be strictly newer
    halt = signed(wire.Halt(halted=True, reason="incident 4711"))
    await publish_retained(broker, wire.halt_topic(), wire.encode(halt))

    async with started_agent(broker.url, tmp_path) as agent:
        assert (await _halted(agent, broker)).halted
        agent.kill()
        await publish_retained(broker, wire.halt_topic(), b"")
        await agent.start()
        after_restart = await _halted(agent, broker)
        refused = await agent.send(command(fault=CPU))

        await publish_retained(broker, wire.halt_topic(), wire.encode(old_resume))
        await asyncio.sleep(0.5)
        replayed = await agent.send(command(fault=CPU))
        await publish_retained(
            broker, wire.halt_topic(), wire.encode(signed(wire.Halt(halted=False)))
        )
        await asyncio.sleep(0.5)
        resumed = await agent.send(command(fault=CPU, duration_s=1))

    assert after_restart.halted and "incident 4711" in after_restart.halt_reason
    assert refused[-1].state == "rejected"
    assert "incident 4711" in (refused[-1].reason or "")
    assert replayed[-1].state == "rejected"
    assert resumed[-1].state == "applied"


async def test_bad_commands_are_rejected_and_agent_stays_healthy(
    broker: Broker, tmp_path: Path
) -> None:
    """Test that garbage, an unknown action and an out-of-policy duration are
    each answered with a rejected ack, counted in /metrics, and that the agent
    still answers ping and /healthz afterwards."""
    config = tmp_path / "agent.yaml"
    config.write_text("policy:\n  max_duration_s: 60\n")

    async with started_agent(
        broker.url, tmp_path, extra_args=["--config", str(config)]
    ) as agent:
        garbage = await agent.send(
            b"\x00not json", until=lambda acks: any(a.state == "rejected" for a in acks)
        )
        assert garbage[-1].command_id is None
        assert "invalid Command" in (garbage[-1].reason or "")

        unknown = json.loads(wire.encode(command("ping")))
        unknown["action"] = "detonate"
        acks = await agent.send(
            json.dumps(unknown).encode(),
            until=lambda acks: any(a.state == "rejected" for a in acks),
        )
        assert "action" in (acks[-1].reason or "")

        too_long = await agent.send(command(fault=CPU, duration_s=600))
        assert too_long[-1].state == "rejected"
        assert "max_duration_s" in (too_long[-1].reason or "")

        pong = await agent.send(command("ping"))
        assert pong[-1].detail["pong"] is True
        code, health = agent.healthz()
        assert code == 200
        assert health["broker_connected"] and health["faults_active"] == 0
        metrics = agent.metrics()
        assert (
            'aftershock_agent_commands_rejected_total{reason="malformed"} 2.0'
            in metrics
        )
        assert (
            'aftershock_agent_commands_rejected_total{reason="policy"} 1.0' in metrics
        )
        assert agent.running


async def test_status_and_telemetry_are_published(
    mosquitto: Broker, tmp_path: Path
) -> None:
    """Test that the retained status carries labels and capabilities, and that
    telemetry samples arrive every interval."""
    async with started_agent(
        mosquitto.url, tmp_path, labels={"zone": "a", "role": "db"}
    ) as agent:
        status = await retained_status(mosquitto.url, agent.site, agent.node)
        assert status is not None and status.online
        assert status.labels == {"zone": "a", "role": "db"}
        assert "cpu" in status.capabilities.faults
        assert status.capabilities.cgroup in ("v1", "v2")

        samples = []
        async with mqtt_client(mosquitto.url) as client:
            await client.subscribe(wire.telemetry_topic(agent.site, agent.node))
            async with asyncio.timeout(10):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    samples.append(wire.decode(wire.Telemetry, message.payload))
                    if len(samples) == 2:
                        break
        assert samples[0].memory_total_bytes > 0
        assert samples[1].at > samples[0].at
        assert "aftershock_node_memory_used_bytes" in agent.metrics()


async def test_sigterm_without_broker_still_reverts(
    mosquitto: Broker, tmp_path: Path
) -> None:
    """Test that an agent whose broker is gone still reverts its faults on
    SIGTERM and exits promptly."""
    agent = AgentProcess(mosquitto.url, tmp_path / "state")
    await agent.start()
    try:
        acks = await agent.send(command(fault=CPU, duration_s=300, lease_s=300))
        assert acks[-1].state == "applied"
        mosquitto.stop()

        assert agent.terminate(timeout=30) == 0
        assert list((agent.state_dir / "journal").glob("*.json")) == []
        reverted = [e for e in agent.log_events() if e["event"] == "fault_reverted"]
        assert [e["cause"] for e in reverted] == ["shutdown"]
    finally:
        agent.kill()


async def test_trusting_agent_acts_only_on_signed_commands(
    mosquitto: Broker, tmp_path: Path
) -> None:
    """Test that an agent started with --trust applies a command signed by
    that key and rejects the same kind of command unsigned."""
    private_path, public_path = wire.generate_key_pair(tmp_path / "keys")
    key = wire.load_private_key(private_path)

    async with started_agent(
        mosquitto.url, tmp_path, extra_args=["--trust", str(public_path)]
    ) as agent:
        unsigned = await agent.send(command("ping", sign=False))
        assert unsigned[-1].state == "rejected"
        assert "unsigned" in (unsigned[-1].reason or "")

        own_key = await agent.send(wire.sign(command("ping", sign=False), key))
        assert own_key[-1].state == "applied"
