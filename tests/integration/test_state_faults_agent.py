"""State and process faults on real replicas through a real agent process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chaos_agent import wire
from tests.agent_process import AgentProcess, command, started_agent, sweep_journal
from tests.brokers import Broker
from tests.replicas import running_replicas

pytestmark = pytest.mark.integration


async def test_a_pause_outlives_a_sigkilled_agent_until_its_restart(
    mosquitto: Broker, tmp_path: Path
) -> None:
    """Test that a replica paused by an agent that is then SIGKILLed stays
    paused, and that the restarted agent resumes it from its journal."""
    with running_replicas(tmp_path / "replicas", count=1) as cluster:
        agent = AgentProcess(mosquitto.url, tmp_path / "state")
        try:
            await agent.start()
            fault = wire.ProcessFault(action="pause", pidfile=str(cluster[0].pidfile))
            inject = command(fault=fault, duration_s=300, lease_s=300)
            acks = await agent.send(inject)
            assert [a.state for a in acks][-1] == "applied", acks

            agent.kill()
            assert not cluster[0].answers(timeout=0.5)

            async with agent.collector() as collector:
                await agent.start()
                reverted = await collector.wait_state(inject.id, "reverted")

            assert reverted.revert_cause == "startup"
            assert reverted.detail["resumed"] == [cluster[0].pid]
            assert cluster[0].answers(timeout=5)
        finally:
            agent.terminate()
            await sweep_journal(agent.state_dir)


async def test_a_restoring_corruption_is_undone_when_its_duration_ends(
    mosquitto: Broker, tmp_path: Path
) -> None:
    """Test that corrupt-state through the agent changes what a replica serves,
    lists what it changed, and is restored when the fault's duration ends."""
    replicas = tmp_path / "replicas"
    policy = json.dumps([str(replicas)])
    env = {"CHAOS_AGENT_POLICY__ALLOWED_STATE_PATHS": policy}
    with running_replicas(replicas, count=1, buckets=["*=100/1"]) as cluster:
        cluster[0].take("k", 30)
        async with started_agent(mosquitto.url, tmp_path, env=env) as agent:
            fault = wire.CorruptStateFault(
                path=str(cluster[0].state_path), mode="set", value=0, restore=True
            )
            inject = command(fault=fault, duration_s=2, lease_s=30)

            async with agent.collector() as collector:
                acks = await agent.send(inject)
                applied = acks[-1]
                served_during = cluster[0].tokens("k")
                reverted = await collector.wait_state(inject.id, "reverted")

        assert applied.state == "applied", applied
        assert applied.detail["changes"][0]["old"] == 30.0
        assert served_during == 100.0
        assert reverted.revert_cause == "duration"
        assert reverted.detail["restored"] == 1
        assert cluster[0].tokens("k") == 70.0
