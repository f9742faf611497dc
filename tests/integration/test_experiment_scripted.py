"""The runner's orchestration against scripted agents (they speak the wire
protocol on a real Mosquitto but apply nothing) and small in-process
replicas: skips, refusals, label discovery, lease renewals, dry runs."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from coordinator.commands import Coordinator
from coordinator.experiment import (
    Experiment,
    parse_experiment,
    plan_experiment,
    run_experiment,
)
from coordinator.mqtt import BrokerSettings, Connector, mqtt_connector
from tests.brokers import Broker
from tests.scripted_agent import ScriptedAgent, run_on_broker

pytestmark = pytest.mark.integration


async def _replica(tokens: float) -> tuple[web.AppRunner, str]:
    """A stand-in replica: every take allowed, a fixed bucket view."""

    async def take(request: web.Request) -> web.Response:
        return web.json_response({"allowed": True})

    async def bucket(request: web.Request) -> web.Response:
        return web.json_response({"tokens": tokens, "capacity": 100})

    app = web.Application()
    app.router.add_post("/v1/take/{key}", take)
    app.router.add_get("/v1/buckets/{key}", bucket)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@asynccontextmanager
async def _fleet(
    broker: Broker, agents: list[ScriptedAgent]
) -> AsyncIterator[Connector]:
    tasks = [
        asyncio.create_task(run_on_broker(a, broker.host, broker.port)) for a in agents
    ]
    try:
        await asyncio.sleep(0.5)
        yield mqtt_connector(BrokerSettings.from_url(broker.url))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
async def replicas() -> AsyncIterator[list[str]]:
    started = [await _replica(50.0), await _replica(50.5)]
    try:
        yield [url for _, url in started]
    finally:
        for runner, _ in started:
            await runner.cleanup()


def _experiment(urls: list[str], method: str, system: str | None = None) -> Experiment:
    endpoints = "\n".join(
        f"    - {{name: r{i}, url: '{url}', node: n{i}}}" for i, url in enumerate(urls)
    )
    system = system or f"system:\n  endpoints:\n{endpoints}\n"
    text = (
        "name: scripted\n"
        + system
        + "load: {rate: 40}\n"
        + "hypothesis: {p99_ms: 1000}\n"
        + "warmup: 200ms\nsteady_state: 1s\ncheck_interval: 250ms\nlease: 1s\n"
        + "recovery: {max: 2s, stable_for: 500ms}\n"
        + "drift: {interval: 250ms}\n"
        + textwrap.dedent(method)
    )
    return parse_experiment(text)


METHOD = """\
method:
  - name: both
    faults:
      - type: cpu
        params: {load_percent: 10}
        target: {nodes: [n0]}
        duration: 2s
      - type: memory
        params: {percent: 5}
        target: {nodes: [n1]}
        duration: 2s
"""


async def test_missing_capability_is_skipped_and_the_rest_runs(
    mosquitto: Broker, replicas: list[str]
) -> None:
    """Test that a fault whose target lacks the capability is skipped with
    the agent's reason while the other fault runs, renewing its lease."""
    n0 = ScriptedAgent("n0")
    n1 = ScriptedAgent("n1", faults=["cpu"], missing={"memory": "no memory cgroup"})

    async with _fleet(mosquitto, [n0, n1]) as connector:
        result = await run_experiment(_experiment(replicas, METHOD), connector)

    assert result.outcome == "held", (result.reason, result.findings)
    by_type = {w.type: w for w in result.windows}
    assert by_type["cpu"].skipped is None and by_type["cpu"].nodes == ("n0",)
    assert "no memory cgroup" in (by_type["memory"].skipped or "")
    assert [c.action for c in n0.commands][:1] == ["inject"]
    assert n1.commands == []
    assert n0.renewals, "the lease was never renewed while the fault held"


async def test_rejected_fault_is_skipped_with_the_agents_reason(
    mosquitto: Broker, replicas: list[str]
) -> None:
    """Test that a fault every target rejects is skipped with the reason."""
    n0 = ScriptedAgent("n0", behaviour="reject", reason="max_delay_ms is 100")
    n1 = ScriptedAgent("n1")

    async with _fleet(mosquitto, [n0, n1]) as connector:
        result = await run_experiment(_experiment(replicas, METHOD), connector)

    by_type = {w.type: w for w in result.windows}
    assert "max_delay_ms is 100" in (by_type["cpu"].skipped or "")
    assert by_type["memory"].skipped is None


@pytest.mark.parametrize(("ack_timeout", "held"), [("500ms", False), ("5s", True)])
async def test_ack_timeout_waits_for_a_slow_node(
    mosquitto: Broker, replicas: list[str], ack_timeout: str, held: bool
) -> None:
    """Test that `ack_timeout` is how long a fault's targets have to answer:
    a node that acks after 1.5 s is skipped at 500 ms and applied at 5 s."""
    n0 = ScriptedAgent("n0", ack_delay_s=1.5)
    n1 = ScriptedAgent("n1")
    method = METHOD.replace("method:", f"ack_timeout: {ack_timeout}\nmethod:")

    async with _fleet(mosquitto, [n0, n1]) as connector:
        result = await run_experiment(_experiment(replicas, method), connector)

    cpu = next(w for w in result.windows if w.type == "cpu")
    if held:
        assert cpu.skipped is None and cpu.nodes == ("n0",)
    else:
        assert "no ack in time" in (cpu.skipped or ""), cpu
    assert [c.action for c in n0.commands][:1] == ["inject"]


async def test_replicas_found_by_agent_labels(
    mosquitto: Broker, replicas: list[str]
) -> None:
    """Test that `system.labels` loads the URL each matching agent carries,
    and the windows map faults to those replicas."""
    agents = [
        ScriptedAgent(f"n{i}", labels={"role": "tb", "aftershock.io/url": url})
        for i, url in enumerate(replicas)
    ]
    agents.append(ScriptedAgent("other", labels={"role": "db"}))
    system = "system:\n  labels: {role: tb}\n"

    async with _fleet(mosquitto, agents) as connector:
        result = await run_experiment(_experiment(replicas, METHOD, system), connector)

    assert {r.replica for r in result.records} == {"n0", "n1"}
    assert {w.replicas for w in result.windows} == {("n0",), ("n1",)}


async def test_unknown_node_fails_the_run_before_any_load(
    mosquitto: Broker, replicas: list[str]
) -> None:
    """Test that a target naming no agent ends the run with exit 2 and sends
    nothing."""
    n0 = ScriptedAgent("n0")
    method = METHOD.replace("nodes: [n1]", "nodes: [ghost]")

    async with _fleet(mosquitto, [n0]) as connector:
        result = await run_experiment(_experiment(replicas, method), connector)

    assert (result.outcome, result.exit_code) == ("failed", 2)
    assert "ghost" in result.reason
    assert result.records == [] and n0.commands == []


async def test_dry_run_plan_resolves_targets_and_skips(
    mosquitto: Broker, replicas: list[str]
) -> None:
    """Test that the plan names each fault's nodes, or why it would skip."""
    n0 = ScriptedAgent("n0")
    n1 = ScriptedAgent("n1", faults=["cpu"], missing={"memory": "no memory cgroup"})
    experiment = _experiment(replicas, METHOD)

    async with (
        _fleet(mosquitto, [n0, n1]) as connector,
        connector() as transport,
        Coordinator(transport) as coordinator,
    ):
        planned = plan_experiment(experiment, await coordinator.snapshot())

    assert [(p.type, p.nodes) for p in planned] == [("cpu", ("n0",)), ("memory", ())]
    assert "no memory cgroup" in (planned[1].skipped or "")
    assert n0.commands == []
