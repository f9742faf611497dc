"""The `aftershock` CLI as a subprocess against real brokers and scripted agents.

A scripted agent (tests/scripted_agent.py) is a real MQTT client that keeps a
retained status and answers commands with acks, but applies nothing; the
real agent's end-to-end tests are in test_cli_agents.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiomqtt
import pytest

from chaos_agent import wire
from coordinator.mqtt import NODELAY
from tests.brokers import Broker
from tests.scripted_agent import ScriptedAgent, run_on_broker

pytestmark = pytest.mark.integration


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def aftershock(broker: Broker, *args: str, within_s: float = 60) -> Run:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator.cli", "--broker", broker.url, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(within_s):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


@asynccontextmanager
async def serving(broker: Broker, *agents: ScriptedAgent) -> AsyncIterator[None]:
    """Scripted agents online on `broker` for the length of the block."""
    tasks = [
        asyncio.create_task(run_on_broker(a, broker.host, broker.port)) for a in agents
    ]
    try:
        await asyncio.sleep(0.3)  # connected, subscribed, status retained
        for task in tasks:
            if task.done():
                task.result()
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def retained(broker: Broker, topic: str) -> bytes | None:
    async with aiomqtt.Client(broker.host, broker.port, socket_options=[NODELAY]) as c:
        await c.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(1.0):
                async for message in c.messages:
                    return bytes(message.payload)  # type: ignore[arg-type]
        except TimeoutError:
            return None
    return None


async def test_agents_json(broker: Broker) -> None:
    """Test that `agents --json` lists the agents' retained statuses."""
    agents = (
        ScriptedAgent("n1", labels={"role": "api"}),
        ScriptedAgent("n2", site="far", faults=["cpu"]),
    )
    async with serving(broker, *agents):
        run = await aftershock(broker, "agents", "--json")

    assert run.code == 0, run.stderr
    listed = {(a["site"], a["node"]): a for a in run.json()}
    assert set(listed) == {("lab", "n1"), ("far", "n2")}
    assert listed[("lab", "n1")]["labels"] == {"role": "api"}
    assert listed[("far", "n2")]["capabilities"]["faults"] == ["cpu"]
    assert all(a["online"] for a in listed.values())


async def test_inject_applied_then_reverted_by_duration(broker: Broker) -> None:
    """Test that inject stays for the duration, sees every target apply and then
    revert on its own duration, and exits 0."""
    agents = (ScriptedAgent("n1"), ScriptedAgent("n2"))
    async with serving(broker, *agents):
        run = await aftershock(
            broker, "inject", "cpu", "--load", "20", "--duration", "1500ms",
            "--lease", "600ms", "--json",
        )  # fmt: skip

    assert run.code == 0, run.stderr
    record = run.json()
    assert {(r["node"], r["state"], r["revert_cause"]) for r in record["results"]} == {
        ("n1", "applied", "duration"),
        ("n2", "applied", "duration"),
    }
    assert agents[0].commands[0].id == agents[1].commands[0].id
    assert str(agents[0].commands[0].id) == record["command_id"]
    assert len(agents[0].renewals) >= 2


async def test_inject_rejected_exits_1(mosquitto: Broker) -> None:
    """Test that a rejecting agent makes inject exit 1 and report the reason."""
    agent = ScriptedAgent("n1", behaviour="reject", reason="cpu is not allowed here")
    async with serving(mosquitto, agent):
        run = await aftershock(
            mosquitto, "inject", "cpu", "--load", "20", "--duration", "10s", "--json"
        )

    assert run.code == 1, run.stderr
    [result] = run.json()["results"]
    assert (result["state"], result["reason"]) == (
        "rejected",
        "cpu is not allowed here",
    )


async def test_status_json_shows_active_faults(mosquitto: Broker) -> None:
    """Test that `status --json` lists the faults in the agents' statuses."""
    agent = ScriptedAgent("n1")
    command = wire.Command(
        expires_at=wire.utcnow().replace(year=2100),
        experiment="exp-9",
        action="inject",
        fault=wire.MemoryFault(percent=10),
        duration_s=300,
        lease_s=30,
    )
    from tests.scripted_agent import active_fault

    status = agent.status([active_fault(command)])
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        topic = wire.status_topic(agent.site, agent.node)
        await client.publish(topic, wire.encode(status), qos=1, retain=True)

    run = await aftershock(mosquitto, "status", "--json")

    assert run.code == 0, run.stderr
    [fault] = run.json()
    assert (fault["node"], fault["type"], fault["experiment"]) == (
        "n1", "memory", "exp-9",
    )  # fmt: skip
    assert fault["fault_id"] == str(command.id)
    assert 250 < fault["expires_in_s"] <= 300


async def test_halt_and_resume_are_retained(broker: Broker) -> None:
    """Test that halt retains halted=true for late subscribers, resume replaces it,
    and inject refuses while halted."""
    halted = await aftershock(broker, "halt", "--reason", "storm")
    late = await retained(broker, wire.halt_topic())
    async with serving(broker, ScriptedAgent("n1")):
        refused = await aftershock(
            broker, "inject", "cpu", "--load", "5", "--duration", "5s"
        )
    resumed = await aftershock(broker, "resume")
    after = await retained(broker, wire.halt_topic())

    assert halted.code == 0 and resumed.code == 0
    assert late is not None
    assert wire.decode(wire.Halt, late).model_dump(include={"halted", "reason"}) == {
        "halted": True,
        "reason": "storm",
    }
    assert refused.code == 2
    assert "halted (storm)" in refused.stderr
    assert after is not None and not wire.decode(wire.Halt, after).halted


async def test_dry_run_sends_nothing(mosquitto: Broker) -> None:
    """Test that --dry-run prints the resolved targets and publishes no command."""
    agent = ScriptedAgent("n1", labels={"role": "api"})
    async with serving(mosquitto, agent):
        run = await aftershock(
            mosquitto, "inject", "latency", "--delay", "100ms", "--select",
            "role=api", "--duration", "30s", "--dry-run", "--json",
        )  # fmt: skip
        await asyncio.sleep(0.3)

    assert run.code == 0, run.stderr
    record = run.json()
    assert record["dry_run"] is True
    assert record["targets"] == [{"node": "n1", "site": "lab"}]
    assert record["command"]["fault"]["delay_ms"] == 100.0
    assert agent.commands == []


async def test_unreachable_broker_exits_2() -> None:
    """Test that an unreachable broker gives exit 2 and names the URL."""
    broker = Broker("none", "127.0.0.1", 1, None, None)  # type: ignore[arg-type]

    run = await aftershock(broker, "agents")

    assert run.code == 2
    assert "mqtt://127.0.0.1:1" in run.stderr
    assert "aftershock broker" in run.stderr
