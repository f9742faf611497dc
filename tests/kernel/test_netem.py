"""netem end to end on a kernel that has it, inside the QEMU guest.

Two namespaces joined by a veth pair; the driver shapes A's end. Round trips
are TCP handshakes from A to a listener in B: the SYN leaves through A's
qdisc, so each handshake carries the delay once. Python runs ~20x slower in
the guest, so the tier is a few tests sharing one set of namespaces, each
printing what it measured.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos_agent.faults.bandwidth import BandwidthDriver
from chaos_agent.faults.base import FaultContext
from chaos_agent.faults.latency import LatencyDriver
from chaos_agent.policy import Policy
from chaos_agent.wire import BandwidthFault, LatencyFault, NetworkTarget
from tests.agent_process import AgentProcess, session_key, sweep_journal
from tests.brokers import Broker
from tests.integration.network_lab import (
    Lab,
    Sink,
    connect_times_ms,
    owned_qdiscs,
    socket_in,
    tcp_sink,
    throughput_kbit,
    two_namespaces,
)

pytestmark = [pytest.mark.kernel, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]
DELAY_MS = 200.0
JITTER_MS = 20.0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with two_namespaces(subnet=7) as lab:
        yield lab


@pytest.fixture(scope="module")
def sink(lab: Lab) -> Iterator[Sink]:
    with tcp_sink(lab.ns_b, lab.addr_b) as sink:
        yield sink


@pytest.fixture
def context(tmp_path: Path) -> FaultContext:
    return FaultContext(policy=Policy(), state_dir=tmp_path)


def where(lab: Lab) -> NetworkTarget:
    return NetworkTarget(netns=lab.ns_a, interface=lab.if_a)


def summary(label: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p10 = ordered[len(ordered) // 10]
    p90 = ordered[(len(ordered) * 9) // 10]
    return (
        f"{label}: median {statistics.median(samples):.1f} ms, "
        f"p10 {p10:.1f}, p90 {p90:.1f}, n={len(samples)}"
    )


async def test_netem_delay_is_measured_and_reverted(
    lab: Lab, sink: Sink, context: FaultContext
) -> None:
    """Test that 200 ms +/- 20 ms adds 200 ms (within 10 %) to each round trip,
    spreads it by the jitter, reads back from the kernel, and that revert
    leaves no qdisc and the round trip as it was."""
    driver = LatencyDriver(context)
    assert (await driver.available()).facts["netem"]
    fault = LatencyFault(delay_ms=DELAY_MS, jitter_ms=JITTER_MS, where=where(lab))
    fid = str(uuid.uuid4())

    before = connect_times_ms(lab.ns_a, lab.addr_b, sink.port, count=10)
    driver.check(fault)
    record = await driver.prepare(fid, fault)
    try:
        detail = await driver.apply(fid, fault, record)
        during = connect_times_ms(lab.ns_a, lab.addr_b, sink.port, count=30)
    finally:
        await driver.revert(record)
    after = connect_times_ms(lab.ns_a, lab.addr_b, sink.port, count=10)

    added = statistics.median(during) - statistics.median(before)
    spread = sorted(during)[27] - sorted(during)[3]
    print(f"\n{summary('rtt before', before)}\n{summary('rtt during', during)}")
    print(f"{summary('rtt after', after)}")
    print(
        f"KERNEL netem asked {DELAY_MS:g}+/-{JITTER_MS:g} ms: added {added:.1f} ms, "
        f"p90-p10 spread {spread:.1f} ms, kernel read back {detail['delay_ms']} ms "
        f"+/- {detail['jitter_ms']} ms"
    )
    assert detail["delay_ms"] == pytest.approx(DELAY_MS, abs=0.01)
    assert detail["jitter_ms"] == pytest.approx(JITTER_MS, abs=0.01)
    assert abs(added - DELAY_MS) <= DELAY_MS * 0.10
    assert spread > JITTER_MS / 2
    assert statistics.median(after) < statistics.median(before) + DELAY_MS / 4
    assert owned_qdiscs(lab.ns_a) == []


async def test_exempt_destination_is_not_delayed(
    lab: Lab, sink: Sink, context: FaultContext
) -> None:
    """Test that a destination in `exempt` keeps its round trip."""
    driver = LatencyDriver(context)
    fault = LatencyFault(
        delay_ms=DELAY_MS, where=where(lab), exempt=[f"{lab.addr_b}/32"]
    )
    fid = str(uuid.uuid4())
    record = await driver.prepare(fid, fault)

    try:
        await driver.apply(fid, fault, record)
        exempt = connect_times_ms(lab.ns_a, lab.addr_b, sink.port, count=10)
    finally:
        await driver.revert(record)

    print(f"\nKERNEL {summary('exempt rtt under 200 ms netem', exempt)}")
    assert statistics.median(exempt) < DELAY_MS / 2


async def test_netem_loss_is_measured(lab: Lab, context: FaultContext) -> None:
    """Test that 30 % loss drops about 30 % of datagrams (generous bounds)."""
    driver = LatencyDriver(context)
    fault = LatencyFault(delay_ms=0, loss_pct=30, where=where(lab))
    fid = str(uuid.uuid4())
    receiver = socket_in(lab.ns_b, socket.SOCK_DGRAM)
    receiver.bind((lab.addr_b, 0))
    receiver.settimeout(1.0)
    sender = socket_in(lab.ns_a, socket.SOCK_DGRAM)
    sent = 400

    record = await driver.prepare(fid, fault)
    try:
        detail = await driver.apply(fid, fault, record)
        for number in range(sent):
            sender.sendto(number.to_bytes(4, "big"), receiver.getsockname())
        received: set[bytes] = set()
        try:
            while len(received) < sent:
                received.add(receiver.recv(16))
        except TimeoutError:
            pass
    finally:
        await driver.revert(record)
        sender.close()
        receiver.close()

    lost = 1 - len(received) / sent
    print(
        f"\nKERNEL netem loss asked 30 %: lost {lost:.1%} of {sent} datagrams, "
        f"kernel read back {detail['loss_pct']} %"
    )
    assert detail["loss_pct"] == pytest.approx(30, abs=0.01)
    assert 0.15 < lost < 0.45


async def test_tbf_bandwidth_is_measured(
    lab: Lab, sink: Sink, context: FaultContext
) -> None:
    """Test that a 2 Mbit/s tbf cap holds on this kernel too."""
    driver = BandwidthDriver(context)
    fault = BandwidthFault(rate_kbit=2000, where=where(lab))
    fid = str(uuid.uuid4())
    record = await driver.prepare(fid, fault)

    try:
        await driver.apply(fid, fault, record)
        during = throughput_kbit(lab.ns_a, lab.addr_b, sink, seconds=3.0)
    finally:
        await driver.revert(record)

    print(f"\nKERNEL tbf asked 2000 kbit/s: measured {during:.0f} kbit/s")
    assert 2000 * 0.5 < during < 2000 * 1.5
    assert owned_qdiscs(lab.ns_a) == []


async def test_sigkill_then_fresh_revert_leaves_nothing(
    lab: Lab, tmp_path: Path
) -> None:
    """Test that a netem fault whose applier died by SIGKILL is removed
    completely by revert(record) from a fresh process."""
    record_file = tmp_path / "record.json"
    script = f"""
import asyncio, json, sys, time
from pathlib import Path
from chaos_agent.faults.base import FaultContext
from chaos_agent.faults.latency import LatencyDriver
from chaos_agent.policy import Policy
from chaos_agent.wire import LatencyFault, NetworkTarget

async def main():
    driver = LatencyDriver(FaultContext(policy=Policy(), state_dir=Path(".")))
    fault = LatencyFault(delay_ms=100, where=NetworkTarget(netns="{lab.ns_a}",
                                                           interface="{lab.if_a}"))
    record = await driver.prepare("{uuid.uuid4()}", fault)
    await driver.apply(record["fault_id"], fault, record)
    Path(sys.argv[1]).write_text(json.dumps(record))
    time.sleep(600)

asyncio.run(main())
"""
    applier = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(record_file), cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(1200):
            if record_file.exists() or applier.returncode is not None:
                break
            await asyncio.sleep(0.1)
        record = json.loads(record_file.read_text())
        left_while_alive = owned_qdiscs(lab.ns_a)
    finally:
        applier.send_signal(signal.SIGKILL)
        await applier.wait()

    reverter = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import asyncio, json, sys\n"
        "from pathlib import Path\n"
        "from chaos_agent.faults.base import FaultContext\n"
        "from chaos_agent.faults.latency import LatencyDriver\n"
        "from chaos_agent.policy import Policy\n"
        "driver = LatencyDriver(FaultContext(policy=Policy(), state_dir=Path('.')))\n"
        "print(json.dumps(asyncio.run(driver.revert(json.loads(sys.argv[1])))))\n",
        json.dumps(record), cwd=REPO, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    output, _ = await reverter.communicate()

    outcome = output.decode().strip()
    print(f"\nKERNEL after SIGKILL: {left_while_alive} -> revert {outcome}")
    assert any("netem" in line for line in left_while_alive)
    assert reverter.returncode == 0
    assert json.loads(output.decode().splitlines()[-1])["outcome"] == "removed"
    assert owned_qdiscs(lab.ns_a) == []


def stage(started: float, what: str) -> None:
    # Progress on the console: a slow guest is told apart from a stuck one.
    print(f"\n[{time.monotonic() - started:6.1f} s] {what}", flush=True)


# Python starts ~20x slower in the guest (the agent and the CLI each import
# pydantic, aiomqtt, pyroute2...): generous waits throughout.
@pytest.mark.timeout(1800)
async def test_cli_latency_through_the_agent_survives_sigkill(
    lab: Lab, sink: Sink, mosquitto: Broker, tmp_path: Path
) -> None:
    """Test the whole chain on netem: `aftershock inject latency` -> Mosquitto
    -> `chaos-agent run` -> kernel; the round trip grows by the delay, the
    qdisc outlives a SIGKILLed agent, and the restarted agent removes it."""
    started = time.monotonic()
    agent = AgentProcess(mosquitto.url, tmp_path / "state")
    try:
        await agent.start(within_s=600)
    except (TimeoutError, RuntimeError):
        print(f"agent log:\n{agent.log()[-4000:]}", flush=True)
        agent.kill()
        raise
    stage(started, "agent online")
    inject: asyncio.subprocess.Process | None = None
    try:
        before = connect_times_ms(lab.ns_a, lab.addr_b, sink.port, count=5)
        inject = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "coordinator.cli", "--broker", mosquitto.url,
            "--signing-key", str(session_key().private_path),
            "inject", "latency", "--delay", f"{DELAY_MS:g}ms",
            "--netns", lab.ns_a, "--interface", lab.if_a,
            "--node", agent.node, "--duration", "600s",
            # The agent's first latency command imports its netlink driver:
            # tens of seconds in the guest, far past the 10 s default.
            "--ack-timeout", "300s",
            cwd=REPO, stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(3000):
            if owned_qdiscs(lab.ns_a) or inject.returncode is not None:
                break
            await asyncio.sleep(0.2)
        stage(started, f"qdisc seen: {owned_qdiscs(lab.ns_a)}")
        during = connect_times_ms(lab.ns_a, lab.addr_b, sink.port, count=10)
        agent.kill()
        after_kill = owned_qdiscs(lab.ns_a)
        inject.kill()
        await inject.wait()
        await agent.start(within_s=600)
        stage(started, "agent restarted")
        for _ in range(600):
            if not owned_qdiscs(lab.ns_a):
                break
            await asyncio.sleep(0.5)
        after_restart = owned_qdiscs(lab.ns_a)
    finally:
        if inject is not None and inject.returncode is None:
            inject.kill()
        agent.terminate()
        await sweep_journal(agent.state_dir)

    added = statistics.median(during) - statistics.median(before)
    print(
        f"\nKERNEL cli->agent netem {DELAY_MS:g} ms: added {added:.1f} ms "
        f"({summary('rtt during', during)}); after SIGKILL {len(after_kill)} "
        f"qdiscs left, after restart {len(after_restart)}"
    )
    assert abs(added - DELAY_MS) <= DELAY_MS * 0.10
    assert any("netem" in line for line in after_kill)
    assert after_restart == []
