"""`aftershock inject`: options -> wire command, outcomes -> output and exit code.

The CLI runs against an in-memory broker with scripted agents (`CliDeps`), so
these tests see exactly what it would publish, without a network.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from chaos_agent import wire
from coordinator.cli import CliDeps, app
from tests.scripted_agent import ScriptedAgent
from tests.unit.memory_broker import MemoryBroker


@pytest.fixture
def broker() -> MemoryBroker:
    broker = MemoryBroker()
    broker.add(ScriptedAgent("n1", labels={"role": "api"}))
    broker.add(ScriptedAgent("n2", labels={"role": "api"}))
    broker.add(ScriptedAgent("n3", labels={"role": "db"}))
    return broker


def invoke(broker: MemoryBroker, *args: str) -> Any:
    return CliRunner().invoke(app, list(args), obj=CliDeps(connector=broker.connect))


def injects(broker: MemoryBroker) -> list[tuple[str, wire.Command]]:
    return [(t, c) for t, c in broker.commands() if c.action == "inject"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["cpu", "--load", "80", "--workers", "2"], {"load_percent": 80, "workers": 2}),
        (
            ["memory", "--size", "512MiB", "--ramp", "10s"],
            {"bytes": 512 * 2**20, "percent": None, "ramp_s": 10.0},
        ),
        (["memory", "--size", "30%"], {"bytes": None, "percent": 30.0}),
        (
            [
                "latency", "--delay", "200ms", "--jitter", "20ms", "--loss", "1",
                "--interface", "eth0", "--netns", "lab", "--engine", "proxy",
                "--port", "8080", "--exempt", "198.18.5.0/24",
            ],
            {
                "delay_ms": 200.0,
                "jitter_ms": 20.0,
                "loss_pct": 1.0,
                "engine": "proxy",
                "ports": [8080],
                "where": {"netns": "lab", "interface": "eth0"},
                "exempt": ["198.18.5.0/24"],
                "exempt_broker": True,
            },
        ),
        (
            ["bandwidth", "--rate", "1mbit", "--burst", "64KiB"],
            {"rate_kbit": 1000, "burst_bytes": 65536, "latency_ms": 50.0},
        ),
        (
            ["partition", "--peer", "198.18.0.2", "--peer", "198.18.1.0/24"],
            {"peers": ["198.18.0.2/32", "198.18.1.0/24"], "direction": "both"},
        ),
        (
            ["corrupt-state", "--path", "/var/lib/tb/state.db", "--mode", "scale",
             "--factor", "0.5"],
            {"path": "/var/lib/tb/state.db", "mode": "scale", "factor": 0.5,
             "adapter": "sqlite"},
        ),
        (
            ["process", "--name", "token-bucket", "--action", "pause"],
            {"name": "token-bucket", "action": "pause", "signal": "SIGKILL"},
        ),
    ],
)  # fmt: skip
def test_options_map_to_the_wire_fault(
    broker: MemoryBroker, args: list[str], expected: dict[str, Any]
) -> None:
    """Test that each fault type's options become the matching wire fields."""
    result = invoke(broker, "inject", *args, "--duration", "30s", "--detach", "--json")

    assert result.exit_code == 0, result.output
    [(_, command), *_] = injects(broker)
    assert command.fault is not None
    fault = command.fault.model_dump(mode="json")
    for key, value in expected.items():
        if isinstance(value, dict):
            assert {k: fault[key][k] for k in value} == value
        else:
            assert fault[key] == value, key
    assert command.fault.type == args[0]


def test_one_command_published_per_node_topic(broker: MemoryBroker) -> None:
    """Test that the inject goes once to each target's own command topic."""
    result = invoke(
        broker, "inject", "cpu", "--load", "50", "--select", "role=api",
        "--duration", "30s", "--detach", "--experiment", "e1", "--json",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    sent = injects(broker)
    assert [t for t, _ in sent] == [wire.command_topic("lab", "n1"),
                                    wire.command_topic("lab", "n2")]  # fmt: skip
    command = sent[0][1]
    assert all(c.id == command.id for _, c in sent)
    assert command.target.nodes == ["n1", "n2"]
    assert command.experiment == "e1"
    assert command.duration_s == 30.0
    # Detached: nobody renews, so the lease covers the whole duration.
    assert command.lease_s == 30.0


def test_json_output_has_command_id_and_results(broker: MemoryBroker) -> None:
    """Test that --json prints the command id and one applied result per node."""
    result = invoke(
        broker, "inject", "cpu", "--load", "50", "--node", "n3",
        "--duration", "30s", "--detach", "--json",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    [(_, command)] = injects(broker)
    assert record["command_id"] == str(command.id)
    assert [(r["node"], r["state"], r["reason"]) for r in record["results"]] == [
        ("n3", "applied", None)
    ]


def test_global_json_option_works_too(broker: MemoryBroker) -> None:
    """Test that --json before the command gives the same JSON output."""
    result = invoke(
        broker, "--json", "inject", "cpu", "--load", "50", "--node", "n3",
        "--duration", "30s", "--detach",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["state"] == "applied"


def test_rejection_exits_1_and_reverts_the_others(broker: MemoryBroker) -> None:
    """Test that one rejecting target fails the inject, with its reason, and the
    targets that applied are reverted at once."""
    broker.agents[1].behaviour = "reject"

    result = invoke(
        broker, "inject", "cpu", "--load", "50", "--select", "role=api",
        "--duration", "30s", "--json",
    )  # fmt: skip

    assert result.exit_code == 1, result.output
    results = {r["node"]: r for r in json.loads(result.stdout)["results"]}
    assert results["n2"]["state"] == "rejected"
    assert "max_duration_s" in results["n2"]["reason"]
    assert results["n1"]["state"] == "applied"
    assert results["n1"]["revert_state"] == "reverted"
    reverts = [(t, c) for t, c in broker.commands() if c.action == "revert"]
    assert [t for t, _ in reverts] == [wire.command_topic("lab", "n1")]


def test_silent_target_times_out(broker: MemoryBroker) -> None:
    """Test that a target that never answers is reported as timeout, exit 1."""
    broker.agents[2].behaviour = "silent"

    result = invoke(
        broker, "inject", "cpu", "--load", "50", "--node", "n3",
        "--duration", "30s", "--ack-timeout", "200ms", "--json",
    )  # fmt: skip

    assert result.exit_code == 1, result.output
    [node] = json.loads(result.stdout)["results"]
    assert (node["state"], node["revert_state"]) == ("timeout", "timeout")
    assert "waited 0.2s" in node["reason"]
    assert "lease (15s) ends it" in node["reason"]


def test_stays_for_the_duration_renewing_the_lease(broker: MemoryBroker) -> None:
    """Test that without --detach the CLI renews the lease until the agents
    report the duration revert, then exits 0."""
    result = invoke(
        broker, "inject", "cpu", "--load", "50", "--node", "n1",
        "--duration", "600ms", "--lease", "150ms", "--experiment", "hold", "--json",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    [node] = json.loads(result.stdout)["results"]
    assert (node["revert_state"], node["revert_cause"]) == ("reverted", "duration")
    renewals = broker.agents[0].renewals
    assert len(renewals) >= 3
    assert {r.experiment for r in renewals} == {"hold"}
    # Reverted by its duration: no revert command was needed.
    assert not [c for _, c in broker.commands() if c.action == "revert"]


def test_dry_run_sends_nothing(broker: MemoryBroker) -> None:
    """Test that --dry-run prints the targets and the command and publishes nothing."""
    result = invoke(
        broker, "inject", "cpu", "--load", "50", "--select", "role=api",
        "--duration", "30s", "--dry-run", "--json",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert [t["node"] for t in record["targets"]] == ["n1", "n2"]
    assert record["command"]["fault"]["load_percent"] == 50
    assert broker.published == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cpu", "--load", "150"], "invalid cpu fault: load_percent: "),
        (["cpu", "--load", "50", "--count", "1", "--percent", "5"], "not both"),
        (["memory", "--size", "512"], "'512' is not a size"),
        (["latency", "--delay", "fast"], "'fast' is not a duration"),
        (["latency", "--delay", "1ms", "--engine", "ebpf"], "engine: "),
        (["partition", "--peer", "nowhere"], "'nowhere' is not an IP address"),
        (["process", "--name", "x", "--pid", "42"], "exactly one way"),
        (["corrupt-state", "--path", "p", "--mode", "scale"], "needs a factor"),
        (["cpu", "--load", "50", "--select", "role"], "use KEY=VALUE"),
    ],
)
def test_bad_values_exit_2_with_one_line(
    broker: MemoryBroker, args: list[str], message: str
) -> None:
    """Test that invalid option values give one clear line on stderr, exit 2, and
    publish nothing."""
    result = invoke(broker, "inject", *args, "--duration", "30s")

    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert message in lines[0]
    assert broker.published == []


def test_duration_without_unit_is_refused(broker: MemoryBroker) -> None:
    """Test that `--duration 30` is refused rather than guessed."""
    result = invoke(broker, "inject", "cpu", "--load", "50", "--duration", "30")

    assert result.exit_code == 2
    assert "'30' is not a duration" in result.stderr
    assert broker.published == []


def test_halted_fleet_refuses(broker: MemoryBroker) -> None:
    """Test that a retained halt makes inject refuse, exit 2, sending nothing."""
    halt = wire.encode(wire.Halt(halted=True, reason="incident"))
    broker.publish(wire.halt_topic(), halt, retain=True, record=False)

    result = invoke(broker, "inject", "cpu", "--load", "50", "--duration", "30s")

    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "aftershock: the fleet is halted (incident): run `aftershock resume` first"
    )
    assert broker.published == []


def test_missing_capability_refuses(broker: MemoryBroker) -> None:
    """Test that an agent without the fault type refuses with the agent's reason."""
    broker.add(
        ScriptedAgent(
            "edge", faults=["cpu"], missing={"latency": "the kernel's netem module"}
        )
    )

    result = invoke(broker, "inject", "latency", "--delay", "10ms", "--duration", "5s")

    assert result.exit_code == 2
    assert "lab/edge cannot run latency faults: the kernel's netem module" in (
        result.stderr
    )
    assert broker.published == []


def test_no_match_refuses(broker: MemoryBroker) -> None:
    """Test that no matching online agent refuses with one line, exit 2."""
    result = invoke(
        broker, "inject", "cpu", "--load", "5", "--select", "role=x", "--duration", "5s"
    )

    assert result.exit_code == 2
    assert "no online agent matches role=x" in result.stderr


def test_unreachable_broker_names_the_fix(broker: MemoryBroker) -> None:
    """Test that a broker that cannot be reached exits 2 and suggests a fix."""
    result = CliRunner().invoke(
        app,
        ["--broker", "mqtt://127.0.0.1:1", "inject", "cpu", "--load", "5",
         "--duration", "5s"],
    )  # fmt: skip

    assert result.exit_code == 2
    assert "mqtt://127.0.0.1:1" in result.stderr
    assert "aftershock broker" in result.stderr
