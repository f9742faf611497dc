"""The fleet view: what retained statuses and halts make of it, and when a
snapshot stops collecting."""

from __future__ import annotations

import asyncio
import time

import pytest

from chaos_agent import wire
from coordinator.fleet import FleetView, collect
from coordinator.mqtt import Received
from tests.scripted_agent import ScriptedAgent


def status(agent: ScriptedAgent) -> Received:
    topic, payload, _ = agent.status_message()
    return Received(topic, payload, retain=True)


def test_status_adds_and_replaces_an_agent() -> None:
    """Test that a status adds its agent and a newer one replaces it."""
    fleet = FleetView()
    fleet.apply(status(ScriptedAgent("n1")))
    fleet.apply(status(ScriptedAgent("n1", online=False)))

    [agent] = fleet.sorted_agents()
    assert (agent.site, agent.node, agent.online) == ("lab", "n1", False)


def test_empty_retained_status_removes_the_agent() -> None:
    """Test that an empty retained payload (a cleared status) forgets the agent."""
    fleet = FleetView()
    fleet.apply(status(ScriptedAgent("n1")))

    assert fleet.apply(Received(wire.status_topic("lab", "n1"), b"", retain=True))
    assert fleet.sorted_agents() == []


def test_status_on_another_nodes_topic_is_ignored() -> None:
    """Test that a status whose node differs from its topic is not believed."""
    fleet = FleetView()
    _, payload, _ = ScriptedAgent("n2").status_message()

    assert not fleet.apply(Received(wire.status_topic("lab", "n1"), payload))
    assert fleet.sorted_agents() == []


def test_malformed_status_is_ignored() -> None:
    """Test that a status that is not a valid wire.Status changes nothing."""
    fleet = FleetView()

    assert not fleet.apply(Received(wire.status_topic("lab", "n1"), b'{"node": 1}'))
    assert fleet.sorted_agents() == []


def test_site_halt_and_global_halt() -> None:
    """Test that halts are kept per scope and the global one wins."""
    fleet = FleetView()
    site_halt = wire.encode(wire.Halt(halted=True, reason="site"))
    global_halt = wire.encode(wire.Halt(halted=True, reason="all"))

    fleet.apply(Received(wire.halt_topic("north"), site_halt))
    assert fleet.halt_for("north") is not None
    assert fleet.halt_for("south") is None

    fleet.apply(Received(wire.halt_topic(), global_halt))
    halt = fleet.halt_for("north")
    assert halt is not None and halt.reason == "all"


async def test_collect_stops_once_the_replay_goes_quiet() -> None:
    """Test that a snapshot stops soon after the last retained message instead
    of waiting for its maximum."""
    replay: asyncio.Queue[Received] = asyncio.Queue()
    for node in ("n1", "n2", "n3"):
        replay.put_nowait(status(ScriptedAgent(node)))

    started = time.monotonic()
    fleet = await collect(FleetView(), replay.get, settle_s=0.05, max_wait_s=30)

    assert len(fleet.agents) == 3
    assert time.monotonic() - started < 10


async def test_collect_is_bounded_by_its_maximum() -> None:
    """Test that a broker that never stops sending still ends the snapshot."""

    async def endless() -> Received:
        await asyncio.sleep(0.01)
        return status(ScriptedAgent("n1"))

    started = time.monotonic()
    fleet = await collect(FleetView(), endless, settle_s=1.0, max_wait_s=0.3)

    assert len(fleet.agents) == 1
    assert 0.25 < time.monotonic() - started < 10


@pytest.mark.parametrize("online", [True, False])
def test_telemetry_attaches_to_a_known_agent(online: bool) -> None:
    """Test that telemetry joins its agent's view and is dropped for unknown ones."""
    fleet = FleetView()
    fleet.apply(status(ScriptedAgent("n1", online=online)))
    sample = wire.Telemetry(
        node="n1", site="lab", cpu_count=2, cpu_percent=10.0, load1=0.1,
        memory_total_bytes=1, memory_used_bytes=1, memory_percent=100.0,
    )  # fmt: skip

    assert fleet.apply(Received(wire.telemetry_topic("lab", "n1"), wire.encode(sample)))
    assert not fleet.apply(
        Received(wire.telemetry_topic("lab", "n9"), wire.encode(sample))
    )
    assert fleet.agents[("lab", "n1")].telemetry == sample


async def test_collect_waits_out_a_pause_longer_than_the_settle_time() -> None:
    """Test that a replay pausing longer than the settle time (a starved broker)
    is still collected whole, because the quiet window grows with the gaps."""
    gaps = [0.0, 0.1, 0.1, 0.25, 0.0]

    async def slow_replay() -> Received:
        if not gaps:
            await asyncio.sleep(3600)
        await asyncio.sleep(gaps.pop(0))
        return status(ScriptedAgent(f"n{len(gaps)}"))

    fleet = await collect(FleetView(), slow_replay, settle_s=0.15, max_wait_s=30)

    assert len(fleet.agents) == 5
