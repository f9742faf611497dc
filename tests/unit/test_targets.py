"""Targets and the pure parts of the network faults: no privileges, no kernel.

Namespace resolution is checked against paths that cannot exist; rule and
parameter builders are checked by what they produce.
"""

from __future__ import annotations

import os
from ipaddress import ip_network
from pathlib import Path

import pytest

from chaos_agent.faults.base import FaultContext, FaultRejected
from chaos_agent.faults.latency import (
    NETEM_MISSING,
    LatencyDriver,
    check_netem_parameters,
    netem_parameters,
)
from chaos_agent.faults.partition import build_ruleset, table_name
from chaos_agent.netlink import (
    format_handle,
    is_owned_handle,
    owned_handle,
    u32_destination_keys,
)
from chaos_agent.policy import Policy, PolicyViolation
from chaos_agent.targets import resolve_netns_path
from chaos_agent.wire import LatencyFault, NetworkTarget

TABLE = "aftershock_0123456789ab"


def driver(policy: Policy | None = None, netem: bool | None = True) -> LatencyDriver:
    latency = LatencyDriver(FaultContext(policy=policy or Policy(), state_dir=Path()))
    latency._netem = netem
    latency._proxy_missing = "the proxy engine is not in this build"
    return latency


# ------------------------------------------------------------------ namespaces


def test_no_namespace_means_the_agents_own() -> None:
    """Test that a target naming no namespace resolves to None (no setns)."""
    assert resolve_netns_path(NetworkTarget()) is None


def test_own_namespace_by_pid_is_recognised() -> None:
    """Test that the agent's own namespace, named by pid, needs no setns."""
    assert resolve_netns_path(NetworkTarget(netns_pid=os.getpid())) is None


def test_missing_named_namespace_is_rejected() -> None:
    """Test that a namespace name that does not exist is refused, saying
    that aftershock never creates one."""
    with pytest.raises(FaultRejected, match="never creates one"):
        resolve_netns_path(NetworkTarget(netns="aftershock-no-such-ns"))

    assert not Path("/run/netns/aftershock-no-such-ns").exists()


def test_missing_process_is_rejected() -> None:
    """Test that a pid with no process behind it is refused."""
    with pytest.raises(FaultRejected, match="no process with pid"):
        resolve_netns_path(NetworkTarget(netns_pid=2**22 + 7))


@pytest.mark.parametrize("path", ["/etc/passwd", "/dev/null", "/run/netns/../x"])
def test_netns_path_outside_the_known_places_is_rejected(path: str) -> None:
    """Test that netns_path accepts only /proc/<pid>/ns/net and /run/netns."""
    with pytest.raises(FaultRejected, match="neither /proc/<pid>/ns/net nor"):
        resolve_netns_path(NetworkTarget(netns_path=path))


# --------------------------------------------------------------------- handles


def test_owned_handles_carry_the_prefix_and_differ_by_fault() -> None:
    """Test that qdisc handles are a5xx:0 and two fault ids get two handles."""
    first, second = owned_handle("fault-a"), owned_handle("fault-b")

    assert is_owned_handle(first) and is_owned_handle(second)
    assert first != second
    assert format_handle(first).startswith("a5") and format_handle(first).endswith(":0")
    assert not is_owned_handle(0x10000)


def test_u32_keys_match_an_ipv4_destination() -> None:
    """Test that an IPv4 network becomes one key at offset 16 (destination)."""
    assert u32_destination_keys(ip_network("198.18.0.0/15")) == [
        "0xc6120000/0xfffe0000+16"
    ]


def test_u32_keys_match_an_ipv6_destination() -> None:
    """Test that an IPv6 /64 becomes two keys at offsets 24 and 28."""
    assert u32_destination_keys(ip_network("2001:db8::/64")) == [
        "0x20010db8/0xffffffff+24",
        "0x00000000/0xffffffff+28",
    ]


# ---------------------------------------------------------------------- netem


def test_netem_parameters_carry_every_asked_impairment() -> None:
    """Test that each LatencyFault field reaches pyroute2's netem encoder."""
    fault = LatencyFault(
        delay_ms=200,
        jitter_ms=20,
        correlation_pct=25,
        loss_pct=1.5,
        duplicate_pct=2,
        corrupt_pct=0.5,
        reorder_pct=10,
        rate_kbit=8000,
    )

    params = netem_parameters(fault)

    assert params["delay"] == 200_000 and params["jitter"] == 20_000
    assert params["loss"] == 1.5 and params["duplicate"] == 2
    assert params["delay_corr"] == params["loss_corr"] == params["dup_corr"] == 25
    assert params["prob_corrupt"] == 0.5 and params["prob_reorder"] == 10
    assert params["rate"] == 1_000_000


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"ports": [80]}, "ports select streams only for the proxy engine"),
        ({"direction": "ingress"}, "netem shapes egress only"),
        ({"correlation_pct": 50}, "correlation applies to jitter, loss or duplicate"),
        ({"delay_ms": 0, "reorder_pct": 5}, "set delay_ms"),
        ({"rate_kbit": 2**40}, "netem rate is capped"),
    ],
)
def test_what_netem_cannot_do_is_rejected_by_name(
    fields: dict[str, object], reason: str
) -> None:
    """Test that impossible netem settings are refused with the reason."""
    fault = LatencyFault.model_validate({"delay_ms": 100, **fields})

    with pytest.raises(FaultRejected, match=reason):
        check_netem_parameters(fault)


def test_delay_above_policy_is_a_violation() -> None:
    """Test that delay + jitter above max_delay_ms is refused by policy."""
    latency = driver(Policy(max_delay_ms=100))

    with pytest.raises(PolicyViolation, match="max_delay_ms"):
        latency.check(LatencyFault(delay_ms=90, jitter_ms=20))


def test_loss_above_policy_is_a_violation() -> None:
    """Test that loss above max_loss_pct is refused by policy."""
    latency = driver(Policy(max_loss_pct=5))

    with pytest.raises(PolicyViolation, match="max_loss_pct"):
        latency.check(LatencyFault(delay_ms=10, loss_pct=10))


def test_engine_netem_without_netem_names_the_fix() -> None:
    """Test that engine netem on a kernel without it says how to get it."""
    latency = driver(netem=False)

    with pytest.raises(FaultRejected) as excinfo:
        latency.check(LatencyFault(delay_ms=10, engine="netem"))

    assert str(excinfo.value) == NETEM_MISSING


def test_auto_without_any_engine_says_why_for_both() -> None:
    """Test that auto with neither netem nor the proxy names both gaps."""
    latency = driver(netem=False)

    with pytest.raises(FaultRejected, match=r"sch_netem.*proxy engine is not in"):
        latency.check(LatencyFault(delay_ms=10))


def test_auto_picks_netem_where_the_kernel_has_it() -> None:
    """Test that auto resolves to netem when netem exists."""
    assert driver(netem=True)._choose_engine(LatencyFault(delay_ms=10)) == "netem"


# ------------------------------------------------------------------ partition


def test_table_name_is_the_fault_ids_hex() -> None:
    """Test that a fault id becomes aftershock_ + its first 12 hex digits."""
    name = table_name("0123abcd-4567-89ef-0123-456789abcdef")

    assert name == "aftershock_0123abcd4567"


def test_ruleset_accepts_exempt_before_dropping_peers() -> None:
    """Test that in every chain the exempt accept precedes the peer drop."""
    ruleset = build_ruleset(
        TABLE,
        peers=[ip_network("198.18.0.0/24")],
        exempt=[ip_network("198.18.0.9/32")],
        direction="both",
        interface=None,
    )

    chains = ruleset.split("chain ")[1:]
    assert [c.split()[0] for c in chains] == [
        "input",
        "forward_in",
        "output",
        "forward_out",
    ]
    for chain in chains:
        assert chain.index("accept\n") < chain.index("drop\n")
    assert ruleset.startswith(f"add table inet {TABLE}\ndelete table inet {TABLE}\n")


def test_ruleset_for_egress_has_no_input_chain() -> None:
    """Test that direction egress drops only packets towards the peers."""
    ruleset = build_ruleset(
        TABLE, [ip_network("2001:db8::/64")], [], "egress", interface="eth0"
    )

    assert "hook input" not in ruleset
    assert 'oifname "eth0" ip6 daddr { 2001:db8::/64 } drop' in ruleset


@pytest.mark.parametrize(
    ("table", "interface"),
    [("filter", None), (TABLE, 'eth0" accept; #')],
)
def test_ruleset_refuses_foreign_tables_and_odd_names(
    table: str, interface: str | None
) -> None:
    """Test that only aftershock tables and plain interface names get in."""
    with pytest.raises(ValueError, match="refusing"):
        build_ruleset(table, [ip_network("198.18.0.1/32")], [], "both", interface)
