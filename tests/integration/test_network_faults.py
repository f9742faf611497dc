"""Network faults against the real kernel, in namespaces the tests create.

This kernel has tbf, htb, u32 and nftables but no sch_netem: netem itself is
exercised by the kernel tier (tests/kernel); here its absence is.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos_agent.faults.bandwidth import BandwidthDriver
from chaos_agent.faults.base import FaultContext, FaultFailed, FaultRejected
from chaos_agent.faults.latency import LatencyDriver
from chaos_agent.faults.partition import PartitionDriver, sweep_owned_tables
from chaos_agent.netlink import sweep_owned_qdiscs
from chaos_agent.policy import Policy, PolicyViolation
from chaos_agent.targets import resolve
from chaos_agent.wire import (
    BandwidthFault,
    LatencyFault,
    NetworkTarget,
    PartitionFault,
)
from tests.integration.network_lab import (
    Lab,
    can_connect,
    netns_exists,
    owned_qdiscs,
    root_qdiscs,
    run_in,
    tcp_sink,
    throughput_kbit,
    two_namespaces,
)

pytestmark = [pytest.mark.integration, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def lab() -> Iterator[Lab]:
    with two_namespaces() as lab:
        yield lab


@pytest.fixture
def context(tmp_path: Path) -> FaultContext:
    return FaultContext(policy=Policy(), state_dir=tmp_path)


def fault_id() -> str:
    return str(uuid.uuid4())


def where_a(lab: Lab) -> NetworkTarget:
    return NetworkTarget(netns=lab.ns_a, interface=lab.if_a)


# -------------------------------------------------------------------- targets


async def test_default_route_interface_is_the_target(lab: Lab) -> None:
    """Test that a target without interface resolves to the default route's."""
    target = await resolve(NetworkTarget(netns=lab.ns_a))

    assert target.interface == lab.if_a
    assert target.netns_path == lab.path_a


async def test_route_to_picks_the_interface_towards_the_destination(lab: Lab) -> None:
    """Test that route_to resolves to the interface a packet would leave by."""
    target = await resolve(NetworkTarget(netns=lab.ns_b, route_to=lab.addr_a))

    assert target.interface == lab.if_b


async def test_process_namespace_is_targeted_by_pid(lab: Lab) -> None:
    """Test that netns_pid reaches the namespace a process runs in."""
    sleeper = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", lab.ns_b, "sleep", "30"
    )  # fmt: skip
    try:
        # `ip netns exec` enters the namespace, then execs sleep in place.
        for _ in range(50):
            if os.readlink(f"/proc/{sleeper.pid}/exe").endswith("sleep"):
                break
            await asyncio.sleep(0.05)
        target = await resolve(NetworkTarget(netns_pid=sleeper.pid, interface=lab.if_b))
    finally:
        sleeper.kill()
        await sleeper.wait()

    assert target.netns_path == f"/proc/{sleeper.pid}/ns/net"
    assert target.interface == lab.if_b


async def test_unknown_interface_is_rejected_naming_the_existing_ones(lab: Lab) -> None:
    """Test that a missing interface is rejected with the list of real ones."""
    with pytest.raises(FaultRejected, match=lab.if_a):
        await resolve(NetworkTarget(netns=lab.ns_a, interface="nosuch0"))


async def test_missing_namespace_is_rejected_and_never_created(lab: Lab) -> None:
    """Test that a namespace that does not exist is refused, not created."""
    name = f"{lab.ns_a}zz"

    with pytest.raises(FaultRejected, match=lab.ns_a):
        await resolve(NetworkTarget(netns=name))

    assert not netns_exists(name)


# ------------------------------------------------------------------ bandwidth


async def test_bandwidth_caps_throughput_and_revert_restores_it(
    lab: Lab, context: FaultContext
) -> None:
    """Test that tbf caps what crosses the veth and revert lifts the cap."""
    driver = BandwidthDriver(context)
    fault = BandwidthFault(rate_kbit=4000, where=where_a(lab))
    fid = fault_id()

    with tcp_sink(lab.ns_b, lab.addr_b) as sink:
        before = throughput_kbit(lab.ns_a, lab.addr_b, sink)
        driver.check(fault)
        record = await driver.prepare(fid, fault)
        try:
            detail = await driver.apply(fid, fault, record)
            during = throughput_kbit(lab.ns_a, lab.addr_b, sink)
        finally:
            reverted = await driver.revert(record)
        after = throughput_kbit(lab.ns_a, lab.addr_b, sink)

    print(
        f"\nbandwidth kbit/s: before {before:.0f} during {during:.0f} after {after:.0f}"
    )
    assert detail["rate_kbit"] == 4000
    assert 4000 * 0.5 < during < 4000 * 1.5
    assert before > 10 * 4000 and after > 10 * 4000
    assert reverted["outcome"] == "removed"
    assert owned_qdiscs(lab.ns_a) == []


async def test_exempt_destination_is_not_shaped(
    lab: Lab, context: FaultContext
) -> None:
    """Test that traffic to an exempt network bypasses the shaping qdisc."""
    driver = BandwidthDriver(context)
    fault = BandwidthFault(
        rate_kbit=2000, where=where_a(lab), exempt=[f"{lab.addr_b}/32"]
    )
    fid = fault_id()
    record = await driver.prepare(fid, fault)

    try:
        await driver.apply(fid, fault, record)
        with tcp_sink(lab.ns_b, lab.addr_b) as sink:
            exempt = throughput_kbit(lab.ns_a, lab.addr_b, sink, seconds=1.0)
    finally:
        await driver.revert(record)

    assert exempt > 10 * 2000


async def test_broker_is_exempt_unless_turned_off(lab: Lab, tmp_path: Path) -> None:
    """Test that the broker's address is exempted by default and not when
    exempt_broker is false."""
    context = FaultContext(policy=Policy(), state_dir=tmp_path, broker_host=lab.addr_b)
    driver = BandwidthDriver(context)

    with_broker = await driver.prepare(fault_id(), BandwidthFault(rate_kbit=100))
    without = await driver.prepare(
        fault_id(), BandwidthFault(rate_kbit=100, exempt_broker=False)
    )

    assert f"{lab.addr_b}/32" in with_broker["exempt"]
    assert without["exempt"] == []


async def test_second_fault_on_the_same_interface_is_refused(
    lab: Lab, context: FaultContext
) -> None:
    """Test that qdisc faults never stack on one interface."""
    driver = BandwidthDriver(context)
    fault = BandwidthFault(rate_kbit=1000, where=where_a(lab))
    first = await driver.prepare(fault_id(), fault)
    await driver.apply(first["fault_id"], fault, first)

    try:
        with pytest.raises(FaultRejected, match="already carries an aftershock fault"):
            await driver.prepare(fault_id(), fault)
    finally:
        await driver.revert(first)


async def test_foreign_root_qdisc_is_left_alone(
    lab: Lab, context: FaultContext
) -> None:
    """Test that a root qdisc installed by someone else is refused and kept."""
    run_in(
        lab.ns_a, "tc", "qdisc", "add", "dev", lab.if_a, "root", "handle", "1:", "htb"
    )
    driver = BandwidthDriver(context)

    with pytest.raises(FaultRejected, match="installed by someone else"):
        await driver.prepare(
            fault_id(), BandwidthFault(rate_kbit=1000, where=where_a(lab))
        )

    assert any("htb 1:" in line for line in root_qdiscs(lab.ns_a))


async def test_disallowed_interface_is_a_policy_violation(tmp_path: Path) -> None:
    """Test that policy.allowed_interfaces is enforced before anything runs."""
    policy = Policy(allowed_interfaces=["eth1"])
    driver = BandwidthDriver(FaultContext(policy=policy, state_dir=tmp_path))
    fault = BandwidthFault(rate_kbit=1000, where=NetworkTarget(interface="lo"))

    with pytest.raises(PolicyViolation, match="allowed_interfaces"):
        driver.check(fault)


async def test_revert_after_the_namespace_is_gone_is_success(
    context: FaultContext,
) -> None:
    """Test that reverting a fault whose namespace vanished counts as done."""
    driver = BandwidthDriver(context)
    with two_namespaces(subnet=1) as lab:
        fault = BandwidthFault(rate_kbit=1000, where=where_a(lab))
        record = await driver.prepare(fault_id(), fault)
        await driver.apply(record["fault_id"], fault, record)

    reverted = await driver.revert(record)

    assert reverted["outcome"] == "namespace gone"


async def test_killed_process_leaves_a_fault_a_fresh_revert_removes(
    lab: Lab, tmp_path: Path
) -> None:
    """Test that a fault applied by a process killed with SIGKILL is removed
    completely by revert(record) from another process."""
    script = f"""
import asyncio, json, sys, time
from pathlib import Path
from chaos_agent.faults.base import FaultContext
from chaos_agent.faults.bandwidth import BandwidthDriver
from chaos_agent.faults.partition import PartitionDriver
from chaos_agent.policy import Policy
from chaos_agent.wire import BandwidthFault, NetworkTarget, PartitionFault

async def main():
    context = FaultContext(policy=Policy(), state_dir=Path("."))
    where = NetworkTarget(netns="{lab.ns_a}", interface="{lab.if_a}")
    records = []
    for driver, fault in (
        (BandwidthDriver(context), BandwidthFault(rate_kbit=1000, where=where)),
        (PartitionDriver(context), PartitionFault(peers=["{lab.addr_b}"],
                                                  where=NetworkTarget(netns="{lab.ns_a}"))),
    ):
        record = await driver.prepare("{fault_id()}", fault)
        await driver.apply(record["fault_id"], fault, record)
        records.append(record)
    Path(sys.argv[1]).write_text(json.dumps(records))
    time.sleep(60)

asyncio.run(main())
"""
    record_file = tmp_path / "records.json"
    applier = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(record_file), cwd=REPO,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(300):
            if record_file.exists() or applier.returncode is not None:
                break
            await asyncio.sleep(0.1)
        records = json.loads(record_file.read_text())
        assert owned_qdiscs(lab.ns_a) != []
    finally:
        applier.send_signal(signal.SIGKILL)
        await applier.wait()

    context = FaultContext(policy=Policy(), state_dir=REPO)
    await BandwidthDriver(context).revert(records[0])
    await PartitionDriver(context).revert(records[1])

    assert owned_qdiscs(lab.ns_a) == []
    assert "aftershock_" not in run_in(lab.ns_a, "nft", "list", "tables").stdout


async def test_reconcile_sweeps_only_what_the_agent_owns(
    lab: Lab, context: FaultContext
) -> None:
    """Test that the sweep deletes a5xx: qdiscs and aftershock tables only."""
    run_in(
        lab.ns_b, "tc", "qdisc", "add", "dev", lab.if_b, "root", "handle", "1:", "htb"
    )
    run_in(lab.ns_a, "nft", "add", "table", "inet", "operator_firewall")
    fault = BandwidthFault(rate_kbit=1000, where=where_a(lab))
    record = await BandwidthDriver(context).prepare(fault_id(), fault)
    await BandwidthDriver(context).apply(record["fault_id"], fault, record)
    partition = PartitionFault(peers=[lab.addr_b], where=NetworkTarget(netns=lab.ns_a))
    driver = PartitionDriver(context)
    await driver.apply("x", partition, await driver.prepare(fault_id(), partition))

    cleaned = await sweep_owned_qdiscs(lab.path_a)
    cleaned_b = await sweep_owned_qdiscs(lab.path_b)
    swept = await sweep_owned_tables(lab.path_a)

    assert cleaned == [lab.if_a] and cleaned_b == []
    assert len(swept) == 1
    assert any("htb 1:" in line for line in root_qdiscs(lab.ns_b))
    assert "operator_firewall" in run_in(lab.ns_a, "nft", "list", "tables").stdout


# -------------------------------------------------------------------- latency


async def test_missing_netem_is_rejected_and_changes_nothing(
    lab: Lab, context: FaultContext
) -> None:
    """Test that engine netem on a kernel without it is refused with the fix,
    and that a forced apply leaves no qdisc behind."""
    driver = LatencyDriver(context)
    if (await driver.available()).facts["netem"]:
        pytest.skip("this kernel has sch_netem; the kernel tier covers it")
    fault = LatencyFault(delay_ms=100, engine="netem", where=where_a(lab))

    with pytest.raises(FaultRejected, match=r"modprobe sch_netem.*--engine proxy"):
        driver.check(fault)
    # As if the probe had been wrong: the kernel's refusal must undo the rest.
    driver._netem = True
    record = await driver.prepare(fault_id(), fault)
    with pytest.raises(FaultFailed, match="no sch_netem"):
        await driver.apply(record["fault_id"], fault, record)

    assert owned_qdiscs(lab.ns_a) == []


async def test_latency_availability_lists_usable_engines(context: FaultContext) -> None:
    """Test that latency's facts say whether netem exists and which engines
    can run, consistently."""
    availability = await LatencyDriver(context).available()

    engines = availability.facts["engines"]
    assert ("netem" in engines) == availability.facts["netem"]
    assert availability.ok == bool(engines)


# ------------------------------------------------------------------ partition


async def test_partition_cuts_peers_and_revert_heals(
    lab: Lab, context: FaultContext
) -> None:
    """Test that a partition drops TCP to the peer until it is reverted."""
    driver = PartitionDriver(context)
    fault = PartitionFault(
        peers=[f"{lab.addr_b}/32"], where=NetworkTarget(netns=lab.ns_a)
    )
    fid = fault_id()

    with tcp_sink(lab.ns_b, lab.addr_b) as sink, tcp_sink(lab.ns_a, lab.addr_a) as back:
        before = can_connect(lab.ns_a, lab.addr_b, sink.port)
        driver.check(fault)
        record = await driver.prepare(fid, fault)
        try:
            detail = await driver.apply(fid, fault, record)
            during = can_connect(lab.ns_a, lab.addr_b, sink.port)
            reverse = can_connect(lab.ns_b, lab.addr_a, back.port)
        finally:
            first = await driver.revert(record)
        after = can_connect(lab.ns_a, lab.addr_b, sink.port)
        second = await driver.revert(record)

    assert (before, during, after) == (True, False, True)
    assert reverse is False
    assert detail["drop_rules"] == 4
    assert (first["outcome"], second["outcome"]) == ("removed", "absent")


async def test_partition_spares_the_broker(lab: Lab, tmp_path: Path) -> None:
    """Test that the broker stays reachable when it is one of the peers."""
    context = FaultContext(policy=Policy(), state_dir=tmp_path, broker_host=lab.addr_b)
    driver = PartitionDriver(context)
    fault = PartitionFault(peers=["198.18.0.0/24"], where=NetworkTarget(netns=lab.ns_a))
    record = await driver.prepare(fault_id(), fault)

    with tcp_sink(lab.ns_b, lab.addr_b) as sink:
        try:
            await driver.apply(record["fault_id"], fault, record)
            reachable = can_connect(lab.ns_a, lab.addr_b, sink.port)
        finally:
            await driver.revert(record)

    assert reachable
