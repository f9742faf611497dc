"""Target resolution against a fleet view: who an inject goes to, or why not."""

from __future__ import annotations

import pytest

from chaos_agent import wire
from coordinator.commands import (
    FleetHalted,
    InjectRequest,
    InvalidRequest,
    MissingCapability,
    NoMatchingAgent,
    Selector,
    plan_inject,
    resolve_targets,
)
from coordinator.fleet import FleetView
from coordinator.mqtt import Received
from tests.scripted_agent import ScriptedAgent


def fleet_of(*agents: ScriptedAgent) -> FleetView:
    fleet = FleetView()
    for agent in agents:
        topic, payload, _ = agent.status_message()
        assert fleet.apply(Received(topic, payload, retain=True))
    return fleet


def halt(fleet: FleetView, site: str | None, reason: str = "game over") -> None:
    message = wire.encode(wire.Halt(halted=True, reason=reason))
    fleet.apply(Received(wire.halt_topic(site), message, retain=True))


def names(agents: list[object]) -> list[str]:
    return [f"{a.site}/{a.node}" for a in agents]  # type: ignore[attr-defined]


@pytest.fixture
def fleet() -> FleetView:
    return fleet_of(
        ScriptedAgent("a1", site="north", labels={"role": "api", "zone": "1"}),
        ScriptedAgent("a2", site="north", labels={"role": "api", "zone": "2"}),
        ScriptedAgent("d1", site="north", labels={"role": "db"}),
        ScriptedAgent("a3", site="south", labels={"role": "api", "zone": "1"}),
        ScriptedAgent("gone", site="south", labels={"role": "api"}, online=False),
    )


def test_no_constraint_selects_every_online_agent(fleet: FleetView) -> None:
    """Test that an empty selector picks every online agent and no offline one."""
    chosen = resolve_targets(fleet, Selector(), "cpu")
    assert names(chosen) == ["north/a1", "north/a2", "north/d1", "south/a3"]


def test_nodes_are_selected_by_name(fleet: FleetView) -> None:
    """Test that --node picks exactly the named agents."""
    chosen = resolve_targets(fleet, Selector(nodes=("a1", "a3")), "cpu")
    assert names(chosen) == ["north/a1", "south/a3"]


def test_site_restricts_the_fleet(fleet: FleetView) -> None:
    """Test that --site keeps only that site's agents."""
    chosen = resolve_targets(fleet, Selector(site="south"), "cpu")
    assert names(chosen) == ["south/a3"]


def test_every_label_must_match(fleet: FleetView) -> None:
    """Test that several --select pairs must all match."""
    chosen = resolve_targets(
        fleet, Selector(labels={"role": "api", "zone": "1"}), "cpu"
    )
    assert names(chosen) == ["north/a1", "south/a3"]


def test_count_samples_reproducibly_with_a_seed(fleet: FleetView) -> None:
    """Test that --count K picks K matching agents, the same ones for one seed."""
    selector = Selector(labels={"role": "api"}, count=2, seed=7)
    first = names(resolve_targets(fleet, selector, "cpu"))
    again = names(resolve_targets(fleet, selector, "cpu"))
    assert len(first) == 2
    assert set(first) <= {"north/a1", "north/a2", "south/a3"}
    assert first == again


def test_percent_rounds_up_to_at_least_one(fleet: FleetView) -> None:
    """Test that --percent takes ceil(share) of the matching agents, at least one."""
    assert len(resolve_targets(fleet, Selector(percent=50), "cpu")) == 2
    assert len(resolve_targets(fleet, Selector(percent=1), "cpu")) == 1
    assert len(resolve_targets(fleet, Selector(percent=100), "cpu")) == 4


def test_count_larger_than_the_match_is_refused(fleet: FleetView) -> None:
    """Test that asking for more agents than match refuses instead of shrinking."""
    with pytest.raises(
        NoMatchingAgent, match="--count 5 asks for more agents than the 3"
    ):
        resolve_targets(fleet, Selector(labels={"role": "api"}, count=5), "cpu")


def test_no_match_is_refused(fleet: FleetView) -> None:
    """Test that a selector matching no online agent refuses with what it asked."""
    with pytest.raises(NoMatchingAgent, match="no online agent matches role=cache"):
        resolve_targets(fleet, Selector(labels={"role": "cache"}), "cpu")


def test_unknown_node_is_refused(fleet: FleetView) -> None:
    """Test that a --node nobody has reported is refused by name."""
    with pytest.raises(NoMatchingAgent, match="no agent named 'x9'"):
        resolve_targets(fleet, Selector(nodes=("a1", "x9")), "cpu")


def test_offline_node_is_refused(fleet: FleetView) -> None:
    """Test that naming an offline agent refuses and says it is offline."""
    with pytest.raises(NoMatchingAgent, match="south/gone is offline"):
        resolve_targets(fleet, Selector(nodes=("gone",)), "cpu")


def test_node_name_in_two_sites_needs_a_site() -> None:
    """Test that an ambiguous node name asks for --site."""
    fleet = fleet_of(ScriptedAgent("n1", site="x"), ScriptedAgent("n1", site="y"))
    with pytest.raises(NoMatchingAgent, match="exists in sites x, y: add --site"):
        resolve_targets(fleet, Selector(nodes=("n1",)), "cpu")
    assert names(resolve_targets(fleet, Selector(nodes=("n1",), site="y"), "cpu")) == [
        "y/n1"
    ]


def test_global_halt_refuses(fleet: FleetView) -> None:
    """Test that a retained global halt refuses every inject, with its reason."""
    halt(fleet, None, reason="incident 42")
    with pytest.raises(FleetHalted, match=r"the fleet is halted \(incident 42\)"):
        resolve_targets(fleet, Selector(site="south"), "cpu")


def test_site_halt_refuses_only_that_site(fleet: FleetView) -> None:
    """Test that a site's halt refuses targets there and leaves other sites alone."""
    halt(fleet, "north")
    with pytest.raises(FleetHalted, match="site north is halted"):
        resolve_targets(fleet, Selector(labels={"role": "api"}), "cpu")
    assert names(resolve_targets(fleet, Selector(site="south"), "cpu")) == ["south/a3"]


def test_resumed_halt_no_longer_refuses(fleet: FleetView) -> None:
    """Test that a retained resume (halted=false) lifts the refusal."""
    halt(fleet, None)
    resume = wire.encode(wire.Halt(halted=False))
    fleet.apply(Received(wire.halt_topic(), resume, retain=True))
    assert len(resolve_targets(fleet, Selector(), "cpu")) == 4


def test_missing_capability_names_the_reason() -> None:
    """Test that an agent lacking the fault type refuses with its own reason."""
    fleet = fleet_of(
        ScriptedAgent("n1"),
        ScriptedAgent(
            "n2",
            faults=["cpu", "memory"],
            missing={"latency": "the kernel's netem module is not loaded"},
        ),
    )
    with pytest.raises(
        MissingCapability,
        match="lab/n2 cannot run latency faults: the kernel's netem module",
    ):
        resolve_targets(fleet, Selector(), "latency")
    assert len(resolve_targets(fleet, Selector(), "cpu")) == 2


def _latency_request(engine: str) -> InjectRequest:
    return InjectRequest(
        fault=wire.LatencyFault(delay_ms=200, engine=engine, ports=[8080]),  # type: ignore[arg-type]
        selector=Selector(),
        duration_s=30,
        lease_s=10,
        experiment="engines",
    )


def test_named_latency_engine_must_be_one_the_agent_has() -> None:
    """Test that --engine netem is refused, with how to get it, for an agent
    whose kernel has no netem, while auto and proxy go ahead."""
    fleet = fleet_of(ScriptedAgent("n1", latency_engines=["proxy"]))

    with pytest.raises(MissingCapability, match="modprobe sch_netem"):
        plan_inject(fleet, _latency_request("netem"))
    assert plan_inject(fleet, _latency_request("proxy")).targets
    assert plan_inject(fleet, _latency_request("auto")).targets


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 1, "percent": 10.0}, "not both"),
        ({"count": 0}, "at least 1"),
        ({"percent": 0.0}, "more than 0"),
        ({"percent": 120.0}, "at most 100"),
    ],
)
def test_bad_sampling_options_are_refused(
    kwargs: dict[str, float], message: str
) -> None:
    """Test that impossible --count/--percent values are refused up front."""
    with pytest.raises(InvalidRequest, match=message):
        Selector(**kwargs)  # type: ignore[arg-type]


def test_plan_addresses_exact_nodes(fleet: FleetView) -> None:
    """Test that the planned command names exactly the resolved nodes and sites."""
    request = InjectRequest(
        fault=wire.CpuFault(load_percent=50),
        duration_s=30,
        lease_s=15,
        experiment="e1",
        selector=Selector(labels={"zone": "1"}),
    )
    plan = plan_inject(fleet, request)
    assert plan.command.target.nodes == ["a1", "a3"]
    assert plan.command.target.sites == ["north", "south"]
    assert plan.command.action == "inject"
    assert plan.command.expires_at > plan.command.issued_at
