"""A real agent process on a real broker applying real CPU faults: duration,
lease, SIGTERM, SIGKILL and restart, broker restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psutil
import pytest

from chaos_agent import wire
from tests.agent_process import (
    AgentProcess,
    command,
    retained_status,
    signed,
    started_agent,
    sweep_journal,
    wait_status,
)
from tests.brokers import Broker, start_mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.root]

# A light fault: one worker at 5% of a core, enough to find its process.
CPU = wire.CpuFault(load_percent=5, workers=1)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_nothing_left(detail: dict[str, Any]) -> None:
    """No worker process and no cgroup directory of the fault remain."""
    assert detail["pids"], "the applied ack should name the worker pids"
    assert not [pid for pid in detail["pids"] if alive(pid)]
    assert not [d for d in detail["cgroup"] if Path(d).exists()]


async def tree_cpu_percent(pid: int, over_s: float) -> float:
    """Percent of one core used by `pid` and its descendants over `over_s`."""
    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]

    def cpu_seconds() -> float:
        total = 0.0
        for process in tree:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    before = cpu_seconds()
    await asyncio.sleep(over_s)
    return (cpu_seconds() - before) / over_s * 100


def cgroups_exist(detail: dict[str, Any]) -> bool:
    return all(Path(d).is_dir() for d in detail["cgroup"])


def assert_running(detail: dict[str, Any]) -> None:
    assert all(alive(pid) for pid in detail["pids"])
    assert cgroups_exist(detail)


async def test_fault_reverted_when_duration_ends(
    broker: Broker, tmp_path: Path
) -> None:
    """Test that an inject is applied (workers running in their cgroup), then
    reverted with cause `duration`, leaving no process and no cgroup."""
    async with started_agent(broker.url, tmp_path) as agent:
        inject = command(fault=CPU, duration_s=2, lease_s=30)
        async with agent.collector() as acks:
            await acks.publish(
                wire.command_topic(agent.site, agent.node), wire.encode(inject)
            )
            applied = await acks.wait_state(inject.id, "applied")
            assert_running(applied.detail)

            reverted = await acks.wait_state(inject.id, "reverted", within_s=15)

        assert reverted.revert_cause == "duration"
        assert reverted.timings.elapsed_ms >= 2000
        assert_nothing_left(applied.detail)


async def test_fault_reverted_when_renewals_stop(
    broker: Broker, tmp_path: Path
) -> None:
    """Test that renewals keep a fault past its first lease, and that once they
    stop the agent reverts it with cause `lease`."""
    async with started_agent(broker.url, tmp_path) as agent:
        inject = command(fault=CPU, duration_s=120, lease_s=2, experiment="leased")
        renewal = wire.encode(signed(wire.LeaseRenewal(experiment="leased", lease_s=2)))
        async with agent.collector() as acks:
            await acks.publish(
                wire.command_topic(agent.site, agent.node), wire.encode(inject)
            )
            applied = await acks.wait_state(inject.id, "applied")
            for _ in range(8):  # 4 s of renewals: twice the lease
                await acks.publish(wire.lease_topic("leased"), renewal)
                await asyncio.sleep(0.5)
            assert not [a for a in acks.of(inject.id) if a.state == "reverted"]
            assert_running(applied.detail)

            reverted = await acks.wait_state(inject.id, "reverted", within_s=10)

        assert reverted.revert_cause == "lease"
        assert_nothing_left(applied.detail)


async def test_sigterm_reverts_before_exit(broker: Broker, tmp_path: Path) -> None:
    """Test that SIGTERM reverts the active fault (cause `shutdown`), exits 0
    and leaves an offline retained status."""
    async with started_agent(broker.url, tmp_path) as agent:
        inject = command(fault=CPU, duration_s=120, lease_s=120)
        async with agent.collector() as acks:
            await acks.publish(
                wire.command_topic(agent.site, agent.node), wire.encode(inject)
            )
            applied = await acks.wait_state(inject.id, "applied")

            assert agent.terminate() == 0
            reverted = await acks.wait_state(inject.id, "reverted")

        assert reverted.revert_cause == "shutdown"
        assert_nothing_left(applied.detail)
        status = await retained_status(broker.url, agent.site, agent.node)
        assert status is not None and not status.online
        assert list((agent.state_dir / "journal").glob("*.json")) == []


async def test_sigkill_then_restart_leaves_nothing(
    broker: Broker, tmp_path: Path
) -> None:
    """Test that after SIGKILL mid-fault the broker shows the agent offline and
    the journal still holds the fault, and that a restart reverts it (cause
    `startup`) so that no worker and no cgroup is left."""
    agent = AgentProcess(broker.url, tmp_path / "state")
    try:
        await agent.start()
        inject = command(fault=CPU, duration_s=300, lease_s=300)
        (applied,) = [a for a in await agent.send(inject) if a.state == "applied"]
        assert_running(applied.detail)

        agent.kill()
        await wait_status(broker.url, agent.site, agent.node, lambda s: not s.online)
        # Workers die with the agent (PR_SET_PDEATHSIG); their cgroup stays
        # until the journal is reconciled.
        assert cgroups_exist(applied.detail)
        journal = list((agent.state_dir / "journal").glob("*.json"))
        assert [p.stem for p in journal] == [str(inject.id)]

        async with agent.collector() as acks:
            await agent.start()
            reverted = await acks.wait_state(inject.id, "reverted")

        assert reverted.revert_cause == "startup"
        assert_nothing_left(applied.detail)
        assert list((agent.state_dir / "journal").glob("*.json")) == []
        # CPU back to baseline: the restarted agent's whole process tree is
        # idle again (an idle agent uses well under 1 % of a core).
        assert await tree_cpu_percent(agent.pid, over_s=1.0) < 20.0
    finally:
        agent.terminate()
        await sweep_journal(agent.state_dir)


async def test_broker_restart_mid_fault(tmp_path: Path) -> None:
    """Test that a fault whose lease lapses while the broker is down is still
    reverted on time, and that the agent reconnects and republishes its
    status once the broker is back."""
    broker = start_mosquitto(tmp_path)
    try:
        async with started_agent(broker.url, tmp_path) as agent:
            inject = command(fault=CPU, duration_s=120, lease_s=2)
            (applied,) = [a for a in await agent.send(inject) if a.state == "applied"]

            broker.stop()
            await asyncio.sleep(4)  # the lease ends while the broker is away
            assert_nothing_left(applied.detail)

            broker = start_mosquitto(tmp_path, port=broker.port)
            status = await wait_status(
                broker.url, agent.site, agent.node, lambda s: s.online
            )
            assert status.faults == []
            assert agent.healthz()[1]["broker_connected"]
            events = [e for e in agent.log_events() if e["event"] == "fault_reverted"]
            assert [e["cause"] for e in events] == ["lease"]
    finally:
        broker.stop()
