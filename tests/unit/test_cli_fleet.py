"""`aftershock agents | status | halt | resume | watch` against an in-memory broker."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from chaos_agent import wire
from coordinator.cli import CliDeps, app
from tests.scripted_agent import ScriptedAgent, active_fault
from tests.unit.memory_broker import MemoryBroker


def invoke(broker: MemoryBroker, *args: str) -> Any:
    return CliRunner().invoke(app, list(args), obj=CliDeps(connector=broker.connect))


@pytest.fixture
def broker() -> MemoryBroker:
    broker = MemoryBroker()
    broker.add(ScriptedAgent("n1", site="north", labels={"role": "api"}))
    broker.add(
        ScriptedAgent(
            "n2",
            site="south",
            faults=["cpu"],
            missing={"latency": "the kernel's netem module"},
            online=False,
        )
    )
    return broker


def publish_status(
    broker: MemoryBroker, agent: ScriptedAgent, command: wire.Command
) -> None:
    status = agent.status([active_fault(command)])
    topic = wire.status_topic(agent.site, agent.node)
    broker.publish(topic, wire.encode(status), retain=True, record=False)


def test_agents_json_lists_every_agent(broker: MemoryBroker) -> None:
    """Test that `agents --json` gives node, site, online, labels, capabilities and
    faults for each agent, online or not."""
    result = invoke(broker, "agents", "--json")

    assert result.exit_code == 0, result.output
    agents = json.loads(result.stdout)
    assert [(a["node"], a["site"], a["online"]) for a in agents] == [
        ("n1", "north", True),
        ("n2", "south", False),
    ]
    assert agents[0]["labels"] == {"role": "api"}
    assert agents[1]["capabilities"]["faults"] == ["cpu"]
    assert agents[1]["capabilities"]["missing"] == {
        "latency": "the kernel's netem module"
    }
    assert agents[0]["faults"] == []


def test_agents_respects_the_global_site(broker: MemoryBroker) -> None:
    """Test that the global --site keeps only that site's agents."""
    result = invoke(broker, "--site", "south", "agents", "--json")

    assert [a["node"] for a in json.loads(result.stdout)] == ["n2"]


def test_agents_table_for_people(broker: MemoryBroker) -> None:
    """Test that without --json a table names the agents and what they lack."""
    result = invoke(broker, "agents")

    assert result.exit_code == 0
    assert "n1" in result.stdout and "north" in result.stdout
    assert "not: latency" in result.stdout


def test_status_json_lists_active_faults(broker: MemoryBroker) -> None:
    """Test that `status --json` lists each active fault with its time left."""
    agent = broker.agents[0]
    command = wire.Command(
        expires_at=wire.utcnow().replace(year=2100),
        experiment="e7",
        action="inject",
        fault=wire.CpuFault(load_percent=10),
        duration_s=120,
        lease_s=15,
    )
    publish_status(broker, agent, command)

    result = invoke(broker, "status", "--json")

    assert result.exit_code == 0, result.output
    [fault] = json.loads(result.stdout)
    assert fault["node"] == "n1"
    assert fault["fault_id"] == str(command.id)
    assert fault["type"] == "cpu"
    assert fault["experiment"] == "e7"
    assert 100 < fault["expires_in_s"] <= 120


def test_halt_publishes_a_retained_halt(broker: MemoryBroker) -> None:
    """Test that `halt` retains a Halt(halted=True) with the reason."""
    result = invoke(broker, "halt", "--reason", "pager went off")

    assert result.exit_code == 0, result.output
    halt = wire.decode(wire.Halt, broker.retained[wire.halt_topic()])
    assert (halt.halted, halt.reason) == (True, "pager went off")
    [published] = broker.published
    assert published.retain


def test_site_halt_and_resume(broker: MemoryBroker) -> None:
    """Test that --site halts and resumes only that site's retained topic."""
    invoke(broker, "halt", "--site", "north")
    assert wire.decode(wire.Halt, broker.retained[wire.halt_topic("north")]).halted
    assert wire.halt_topic() not in broker.retained

    result = invoke(broker, "resume", "--site", "north", "--json")

    assert result.exit_code == 0, result.output
    assert not wire.decode(wire.Halt, broker.retained[wire.halt_topic("north")]).halted
    assert json.loads(result.stdout)["still_halted"] == []


def test_resume_of_a_site_reports_a_global_halt(broker: MemoryBroker) -> None:
    """Test that resuming a site says so when the global halt still holds."""
    invoke(broker, "halt")

    result = invoke(broker, "resume", "--site", "north", "--json")

    assert json.loads(result.stdout)["still_halted"] == ["fleet"]


def test_watch_json_prints_one_line_per_sample(broker: MemoryBroker) -> None:
    """Test that `watch --json --count N` prints N telemetry lines and stops."""

    def publish_samples(filters: tuple[str, ...]) -> None:
        if wire.TELEMETRY_WILDCARD not in filters:
            return
        for load in (0.5, 1.5, 2.5):
            sample = wire.Telemetry(
                node="n1", site="north", cpu_count=2, cpu_percent=40.0, load1=load,
                memory_total_bytes=2**30, memory_used_bytes=2**29, memory_percent=50.0,
            )  # fmt: skip
            broker.publish(wire.telemetry_topic("north", "n1"), wire.encode(sample))

    broker.on_subscribe = publish_samples

    result = invoke(broker, "watch", "--json", "--count", "2")

    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["load1"] for line in lines] == [0.5, 1.5]
