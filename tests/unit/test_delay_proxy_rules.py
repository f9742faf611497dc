"""The proxy engine's rulesets, parameter checks and record handling, without
touching the kernel."""

from __future__ import annotations

import ipaddress
import uuid
from pathlib import Path

import pytest

from chaos_agent.delay_proxy import PROXY_MARK
from chaos_agent.faults.base import FaultContext, FaultFailed, FaultRejected
from chaos_agent.faults.proxy_engine import (
    Exemptions,
    ProxyEngine,
    build_ruleset,
    table_name,
)
from chaos_agent.policy import Policy, PolicyViolation
from chaos_agent.wire import LatencyFault, NetworkTarget

TABLE = table_name("5b0c1c5e-8c1d-4a57-9a3e-0123456789ab")


def chain(ruleset: str, name: str) -> list[str]:
    """The rule lines of chain `name` in a ruleset built by build_ruleset."""
    lines = ruleset.splitlines()
    start = lines.index(f"\tchain {name} {{")
    end = lines.index("\t}", start)
    return [line.strip() for line in lines[start + 2 : end]]


def engine(tmp_path: Path, **policy: object) -> ProxyEngine:
    return ProxyEngine(
        FaultContext(policy=Policy.model_validate(policy), state_dir=tmp_path)
    )


# ------------------------------------------------------------------- ruleset


def test_table_name_is_stable_and_safe() -> None:
    """Test that a fault id always maps to the same short, nft-safe name, even
    when it is not a uuid."""
    fault_id = str(uuid.uuid4())

    assert table_name(fault_id) == table_name(fault_id)
    assert table_name(fault_id) == "aftershock_px_" + uuid.UUID(fault_id).hex[:16]
    assert table_name('x"; flush ruleset').startswith("aftershock_px_")
    assert table_name('x"; flush ruleset')[14:].isalnum()


def test_ingress_redirects_arriving_connections_only() -> None:
    """Test that direction ingress installs a prerouting redirect and no
    output chain."""
    rules = build_ruleset(
        TABLE,
        listen_port=40000,
        ports=[8080],
        direction="ingress",
        exemptions=Exemptions(),
    )

    assert "hook prerouting" in rules
    assert "hook output" not in rules
    assert chain(rules, "ingress")[-1] == "tcp dport { 8080 } redirect to :40000"


def test_both_directions_skip_the_proxy_mark_before_redirecting() -> None:
    """Test that every redirect chain first lets the proxy's own marked
    connections pass, so the proxy never redirects to itself."""
    rules = build_ruleset(
        TABLE,
        listen_port=40000,
        ports=[8080, 443, 8080],
        direction="both",
        exemptions=Exemptions(),
    )

    for name in ("ingress", "egress"):
        lines = chain(rules, name)
        assert lines[0] == f"meta mark {PROXY_MARK:#x} return"
        assert lines[-1] == "tcp dport { 443, 8080 } redirect to :40000"


def test_exemptions_come_before_the_redirect() -> None:
    """Test that the broker and exempt networks are returned from every chain
    before the redirect rule can match them."""
    exemptions = Exemptions(
        networks=(ipaddress.IPv4Network("10.1.0.0/16"),),
        broker_addresses=(ipaddress.IPv4Address("198.18.0.9"),),
        broker_port=1883,
    )
    rules = build_ruleset(
        TABLE,
        listen_port=40000,
        ports=[1883],
        direction="egress",
        exemptions=exemptions,
    )

    lines = chain(rules, "egress")
    redirect = lines.index("tcp dport { 1883 } redirect to :40000")
    assert lines.index("ip daddr 10.1.0.0/16 return") < redirect
    assert lines.index("ip daddr 198.18.0.9 tcp dport 1883 return") < redirect


def test_unresolved_broker_exempts_its_whole_port() -> None:
    """Test that a broker without a known address has its port exempted for
    every destination: the safe side."""
    rules = build_ruleset(
        TABLE,
        listen_port=40000,
        ports=[1883, 80],
        direction="egress",
        exemptions=Exemptions(broker_port=1883),
    )

    assert "tcp dport 1883 return" in chain(rules, "egress")


def test_interface_restricts_the_redirects() -> None:
    """Test that a named interface limits ingress to connections arriving on
    it and egress to connections leaving by it."""
    rules = build_ruleset(
        TABLE,
        listen_port=40000,
        ports=[80],
        direction="both",
        exemptions=Exemptions(),
        interface="eth0",
    )

    assert chain(rules, "ingress")[-1].startswith('iifname "eth0" tcp dport')
    assert chain(rules, "egress")[-1].startswith('oifname "eth0" tcp dport')


def test_guard_admits_only_redirected_connections_to_the_listener() -> None:
    """Test that the listen port accepts redirected connections and resets
    direct ones, so the proxy is no open relay."""
    rules = build_ruleset(
        TABLE,
        listen_port=40000,
        ports=[80],
        direction="ingress",
        exemptions=Exemptions(),
    )

    assert chain(rules, "guard") == [
        "tcp dport 40000 ct status dnat accept",
        "tcp dport 40000 reject with tcp reset",
    ]


def test_ruleset_refuses_a_foreign_table_name() -> None:
    """Test that only an aftershock proxy table name can reach nft."""
    with pytest.raises(ValueError, match="not an aftershock proxy table"):
        build_ruleset(
            "filter",
            listen_port=1,
            ports=[80],
            direction="both",
            exemptions=Exemptions(),
        )


# --------------------------------------------------------------------- check


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("loss_pct", 5.0),
        ("duplicate_pct", 1.0),
        ("corrupt_pct", 1.0),
        ("reorder_pct", 10.0),
        ("correlation_pct", 25.0),
        ("rate_kbit", 1000),
    ],
)
def test_check_rejects_what_only_netem_can_do(
    tmp_path: Path, field: str, value: object
) -> None:
    """Test that packet-level parameters are rejected, naming the field."""
    fault = LatencyFault.model_validate(
        {"delay_ms": 100, "engine": "proxy", "ports": [80], field: value}
    )

    with pytest.raises(FaultRejected, match=field):
        engine(tmp_path).check(fault)


def test_check_rejects_a_fault_without_ports(tmp_path: Path) -> None:
    """Test that the proxy engine needs to know which TCP ports to delay."""
    with pytest.raises(FaultRejected, match="set ports"):
        engine(tmp_path).check(LatencyFault(delay_ms=100, engine="proxy"))


def test_check_enforces_the_delay_cap(tmp_path: Path) -> None:
    """Test that delay plus jitter above the agent's max_delay_ms is refused."""
    fault = LatencyFault(delay_ms=900, jitter_ms=200, engine="proxy", ports=[80])

    with pytest.raises(PolicyViolation, match="max_delay_ms"):
        engine(tmp_path, max_delay_ms=1000).check(fault)


def test_check_needs_an_interface_when_policy_limits_them(tmp_path: Path) -> None:
    """Test that an agent whose policy allows only some interfaces refuses a
    proxy fault that would redirect on all of them, and accepts an allowed
    one."""
    limited = engine(tmp_path, allowed_interfaces=["eth1"])
    everywhere = LatencyFault(delay_ms=100, engine="proxy", ports=[80])
    on_eth1 = LatencyFault(
        delay_ms=100, engine="proxy", ports=[80], where=NetworkTarget(interface="eth1")
    )

    with pytest.raises(PolicyViolation, match="name one with interface"):
        limited.check(everywhere)
    limited.check(on_eth1)


def test_check_refuses_a_missing_namespace(tmp_path: Path) -> None:
    """Test that a namespace that does not exist is refused, never created."""
    fault = LatencyFault(
        delay_ms=100,
        engine="proxy",
        ports=[80],
        where=NetworkTarget(netns=f"aspx-missing-{uuid.uuid4().hex[:8]}"),
    )

    with pytest.raises(FaultRejected, match="does not exist"):
        engine(tmp_path).check(fault)


def test_check_accepts_delay_and_jitter_on_ports(tmp_path: Path) -> None:
    """Test that a plain delay with jitter on TCP ports passes the check."""
    fault = LatencyFault(delay_ms=100, jitter_ms=10, engine="proxy", ports=[80])

    engine(tmp_path).check(fault)


# -------------------------------------------------------------------- record


async def test_prepare_records_the_engine_and_table(tmp_path: Path) -> None:
    """Test that the record names the engine, the table and the namespace."""
    fault_id = str(uuid.uuid4())
    fault = LatencyFault(delay_ms=100, engine="proxy", ports=[80])

    record = await engine(tmp_path).prepare(fault_id, fault)

    assert record == {
        "engine": "proxy",
        "table": table_name(fault_id),
        "netns": None,
        "netns_inode": None,
    }


@pytest.mark.parametrize(
    "record",
    [
        {"engine": "proxy", "table": "filter", "netns": None},
        {"engine": "proxy", "table": "aftershock_px_x; flush ruleset", "netns": None},
        {"engine": "proxy", "table": TABLE, "netns": "relative/path"},
        {"engine": "proxy"},
    ],
)
async def test_revert_refuses_a_record_it_did_not_write(
    tmp_path: Path, record: dict[str, object]
) -> None:
    """Test that a tampered or foreign record is refused before nft runs."""
    with pytest.raises(FaultFailed):
        await engine(tmp_path).revert(record)


async def test_revert_in_a_vanished_namespace_is_success(tmp_path: Path) -> None:
    """Test that when the recorded namespace is gone, so is everything the
    fault put in it: revert succeeds without running nft."""
    record = {
        "engine": "proxy",
        "table": TABLE,
        "netns": str(tmp_path / "gone"),
        "netns_inode": [1, 2],
    }

    detail = await engine(tmp_path).revert(record)

    assert detail["already_gone"] is True
    assert "no longer exists" in detail["namespace_gone"]


async def test_revert_when_the_path_names_another_namespace_is_success(
    tmp_path: Path,
) -> None:
    """Test that a namespace path now naming something else (a reused pid)
    is treated as gone, and nothing is touched there."""
    other = tmp_path / "reused"
    other.write_text("")
    record = {
        "engine": "proxy",
        "table": TABLE,
        "netns": str(other),
        "netns_inode": [0, 0],
    }

    detail = await engine(tmp_path).revert(record)

    assert "another namespace" in detail["namespace_gone"]
    assert detail["table_removed"] is False
