"""The latency experiment through the whole stack, on a kernel with netem.

Inside the QEMU guest: Mosquitto, two token-bucket replicas each in a
network namespace of its own (`tests.replicas`' command line, kept and
stopped by the demo's `Lab`), a signed agent per node, and `run_experiment` sending
low load while one replica's namespace gets 200 ms +/- 20 ms of latency.

The demo joins its namespaces with a bridge, but the guest's init loads no
bridge module (and the guest cannot load one later), so here each namespace
hangs off the root namespace by a veth pair of its own, a /30 in
198.18.9.0/24, and the guest's root namespace routes between them (replicas
gossip with each other).
Each case runs the experiment once per latency engine and prints the
per-replica figures, so CI output shows what each engine added.

Python runs ~20x slower in the guest: the lab is started once for the module,
the load is low, and the waits are generous.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import NetNS

from coordinator import analysis
from coordinator.commands import key_signer
from coordinator.demo import REPLICA_PORT, Lab, Node
from coordinator.experiment import parse_experiment, run_experiment
from coordinator.mqtt import BrokerSettings, mqtt_connector
from coordinator.report import RunResult
from tests.agent_process import AgentProcess, session_key, sweep_journal
from tests.brokers import Broker, running_broker, wait_for_port
from tests.integration.network_lab import ip, netns_exists, run_in
from tests.replicas import replica_argv

pytestmark = [pytest.mark.kernel, pytest.mark.root]

DELAY_MS = 200.0
JITTER_MS = 20.0
# The hypothesis' p99 target: over what a healthy replica answers in even in
# the slow guest (its p99 in CI: 44-67 ms, steady or beside the fault), and
# under what the faulted one answers in: 200 ms +/- 20 ms (uniform jitter)
# alone reaches ~220 ms at its p99, and the guest's base latency comes on
# top (faulted p99 in CI: 279-508 ms). At 280 ms a proxy run once missed the
# finding with a faulted p99 of 278.8 ms.
TARGET_MS = 230.0
# Two nodes: the least that tells the faulted replica from the others, and
# each node's replica and agent cost the slow guest a minute to start.
NODES = 2
# A replica (aiohttp, SQLite) starts in ~1 s here, ~30 s in the guest.
REPLICA_START_S = 300.0
# The demo lab's replicas answer on eth0 inside their namespaces.
INTERFACE = "eth0"


class LatencyLab:
    """The demo's network and replicas, Mosquitto and one agent per node."""

    def __init__(self, lab: Lab, broker: Broker, agents: list[AgentProcess]) -> None:
        self.lab = lab
        self.broker = broker
        self.agents = agents

    @property
    def nodes(self) -> list[Node]:
        return self.lab.nodes


def stage(started: float, what: str) -> None:
    # Progress on the console: a slow guest is told apart from a stuck one.
    print(f"\n[{time.monotonic() - started:6.1f} s] {what}", flush=True)


@pytest.fixture(scope="module")
def latency_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LatencyLab]:
    started = time.monotonic()
    root = tmp_path_factory.mktemp("latency-lab")
    lab = Lab(root, isolated=True)
    # Undone in reverse: agents (they revert their faults on SIGTERM), the
    # guest's forwarding, the broker, then replicas and namespaces.
    with contextlib.ExitStack() as stack:
        stack.callback(lab.close)
        broker = stack.enter_context(running_broker("mosquitto", root))
        stack.enter_context(routed_namespaces(lab))
        _start_replicas(lab)
        stage(started, "replicas answer")
        agents = [
            AgentProcess(
                broker.url,
                root / node.name / "state",
                node=node.name,
                # The run does not judge telemetry: spare the guest's CPU.
                extra_args=("--telemetry-interval", "5"),
            )
            for node in lab.nodes
        ]
        stack.callback(_stop_all, agents)
        # Each agent imports pydantic, aiomqtt and pyroute2 at ~1/20 speed.
        asyncio.run(_start_all(agents, within_s=600))
        stage(started, "agents online")
        yield LatencyLab(lab, broker, agents)


_labs = itertools.count()


@contextlib.contextmanager
def routed_namespaces(lab: Lab, count: int = NODES) -> Iterator[None]:
    """`count` demo nodes, each a namespace with eth0 on a veth pair to the
    root namespace; `lab.close()` deletes them (and their veths with them)."""
    tag = f"{os.getpid() % 10000}x{next(_labs)}"
    for i in range(count):
        netns = f"aftershock-lat-{tag}-{i}"
        outside, inside = f"198.18.9.{4 * i + 1}", f"198.18.9.{4 * i + 2}"
        node = Node(i, lab.root, inside, REPLICA_PORT, ["ip", "netns", "exec", netns])
        node.netns = netns
        lab.nodes.append(node)
        ip("netns", "add", netns)
        veth = f"aslat{tag}h{i}"[:15]
        link = f"link add {veth} type veth peer name {INTERFACE} netns {netns}"
        ip(*link.split())
        ip("addr", "add", f"{outside}/30", "dev", veth)
        ip("link", "set", veth, "up")
        ip("-n", netns, "addr", "add", f"{inside}/30", "dev", INTERFACE)
        ip("-n", netns, "link", "set", INTERFACE, "up")
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "route", "add", "default", "via", outside)

    # Replicas reach each other through the root namespace. Only in the
    # throwaway guest: a development machine's forwarding is left alone
    # (there the replicas' gossip fails, which this test does not judge).
    forwarding = Path("/proc/sys/net/ipv4/ip_forward")
    was = forwarding.read_text()
    in_guest = os.environ.get("AFTERSHOCK_IN_VM") == "1"
    if in_guest:
        forwarding.write_text("1")
    try:
        yield
    finally:
        if in_guest:
            forwarding.write_text(was)


def _start_replicas(lab: Lab) -> None:
    """Each node's replica in its namespace, all at once, with the guest's
    patience; the demo's own start allows 30 s and gossips every 0.2 s, which
    costs the slow guest more CPU than the load (noise in every figure)."""
    for node in lab.nodes:
        peers = [n.url for n in lab.nodes if n is not node]
        argv = replica_argv(
            node.replica_id, node.port, lab.root, peers, ("*=100/10",), "2s", "1s"
        )
        argv[argv.index("--listen") + 1] = f"{node.host}:{node.port}"
        node.replica = lab.spawn([*node.enter, *argv], f"{node.replica_id}.log")
    try:
        for node in lab.nodes:
            wait_for_port(node.host, node.port, REPLICA_START_S, node.replica)
    except (TimeoutError, RuntimeError):
        for node in lab.nodes:
            log = lab.root / f"{node.replica_id}.log"
            print(f"{log}:\n{log.read_text()[-2000:]}", flush=True)
        raise


def _stop_all(agents: list[AgentProcess]) -> None:
    for agent in agents:
        agent.terminate()
        asyncio.run(sweep_journal(agent.state_dir))


async def _start_all(agents: list[AgentProcess], within_s: float) -> None:
    await asyncio.gather(*(agent.start(within_s=within_s) for agent in agents))


def qdisc_kinds(netns: str, interface: str) -> list[str]:
    """The kinds of the qdiscs on `interface`, read back through netlink.
    pyroute2's sync API runs its own event loop: call it from a thread."""
    with NetNS(netns) as ns:
        index = ns.link_lookup(ifname=interface)[0]
        return sorted(str(q.get_attr("TCA_KIND")) for q in ns.get_qdiscs(index=index))


def nft_tables(netns: str) -> list[str]:
    """`nft list tables` lines inside `netns` (the proxy engine's redirect)."""
    return run_in(netns, "nft", "list", "tables").stdout.split("\n")


def experiment_text(lab: LatencyLab, faulted: Node, engine: str) -> str:
    endpoints = "\n".join(
        f"    - {{name: {n.replica_id}, url: '{n.url}', node: {n.name}}}"
        for n in lab.nodes
    )
    # netem delays what leaves the replica's eth0 (its answers); the proxy
    # delays what arrives for the replica's port. Either way each request's
    # round trip carries the delay once.
    where = f"where: {{netns: {faulted.netns}, interface: {INTERFACE}}}"
    if engine == "proxy":
        where += f", ports: [{faulted.port}], direction: ingress"
    return f"""
name: latency-{engine}
system:
  endpoints:
{endpoints}
load: {{rate: 8, keys: {{count: 20}}, timeout: 5s}}
hypothesis: {{p99_ms: {TARGET_MS:g}}}
# The guest's steady state is the slow one of a software CPU: its p99 passes
# the default 1 s abort now and then. Only a broken lab aborts here.
require_steady_state: false
abort:
  - {{metric: error_rate_pct, above: 50, window: 5s}}
warmup: 5s
steady_state: 10s
check_interval: 1s
# The first fault makes an agent import its driver: slow in the guest.
ack_timeout: 120s
recovery: {{max: 20s, stable_for: 2s}}
method:
  - name: latency
    faults:
      - type: latency
        name: slow-{faulted.replica_id}
        params: {{delay_ms: {DELAY_MS:g}, jitter_ms: {JITTER_MS:g},
                  engine: {engine}, {where}}}
        target: {{nodes: [{faulted.name}]}}
        # ~100 requests per replica: a p99 that is not one unlucky sample.
        duration: 25s
"""


@dataclass(frozen=True)
class Figures:
    """One replica's request latency, ms: steady state before the fault and
    during the fault window."""

    steady_p99: float
    fault_p99: float
    steady_median: float
    fault_median: float

    @property
    def added_p99(self) -> float:
        return self.fault_p99 - self.steady_p99

    @property
    def added_median(self) -> float:
        return self.fault_median - self.steady_median


def figures(result: RunResult) -> dict[str, Figures]:
    """Per replica, from the run's own request records."""
    window = next(w for w in result.windows if w.type == "latency")
    steady = [r for r in result.records if r.phase == analysis.STEADY_BEFORE]
    during = analysis.in_window(result.records, window)
    found: dict[str, Figures] = {}
    for name in sorted({r.replica for r in during}):
        before = [r.latency_s * 1000 for r in steady if r.replica == name]
        fault = [r.latency_s * 1000 for r in during if r.replica == name]
        assert before and fault, (name, result.reason)
        found[name] = Figures(
            steady_p99=analysis.percentile(before, 99) or 0.0,
            fault_p99=analysis.percentile(fault, 99) or 0.0,
            steady_median=statistics.median(before),
            fault_median=statistics.median(fault),
        )
    return found


# Known noise: in the guest's software CPU a p99 over ~100 requests is close
# to the slowest one, and a scheduling stall can push the untouched replica
# over the target too (seen once in CI: the run then reports latency-spread).
# One rerun, not more: a real regression fails both runs.
@pytest.mark.flaky(reruns=1)
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("engine", ["netem", "proxy"])
async def test_latency_on_one_replica_is_found_and_reverted(
    latency_lab: LatencyLab, engine: str
) -> None:
    """Test that 200 ms +/- 20 ms on one replica's namespace raises that
    replica's p99 by about the delay and no other's, that the run finds
    `latency-on-faulted-replica` naming it, and that nothing of the fault is
    left on the replica's interface afterwards."""
    started = time.monotonic()
    faulted = latency_lab.nodes[0]
    assert faulted.netns is not None
    qdiscs_before = await asyncio.to_thread(qdisc_kinds, faulted.netns, INTERFACE)
    experiment = parse_experiment(experiment_text(latency_lab, faulted, engine))
    connector = mqtt_connector(BrokerSettings.from_url(latency_lab.broker.url))

    # No report_dir: drawing the report's plots takes the guest a minute.
    result = await run_experiment(
        experiment, connector, signer=key_signer(session_key().private)
    )
    stage(started, f"run {result.outcome}: {result.reason}")

    window = next(w for w in result.windows if w.type == "latency")
    # The guest's init loads nf_tables and its nat modules: both engines run.
    assert window.skipped is None, window.skipped
    measured = figures(result)
    for name, seen in measured.items():
        print(
            f"KERNEL experiment engine={engine} {name}"
            f"{' (faulted)' if name == faulted.replica_id else ''}: "
            f"steady p99 {seen.steady_p99:.1f} ms, fault p99 {seen.fault_p99:.1f} ms,"
            f" added p99 {seen.added_p99:.1f} ms, added median "
            f"{seen.added_median:.1f} ms",
            flush=True,
        )
    assert window.replicas == (faulted.replica_id,)
    slow = measured[faulted.replica_id]
    assert slow.fault_p99 >= DELAY_MS
    # A p99 of a few dozen samples is their slowest: a request that also
    # opened a connection (the load renews its pool every 5 s, and netem
    # holds the SYN-ACK too: twice the delay plus jitter) or met the slow
    # guest's scheduling. A generous band; the median is the sharp figure,
    # and a stacked fault would show there.
    assert DELAY_MS * 0.5 <= slow.added_p99 <= DELAY_MS * 4.0
    assert DELAY_MS * 0.5 <= slow.added_median <= DELAY_MS * 1.5
    for name, seen in measured.items():
        if name != faulted.replica_id:
            assert seen.added_median < DELAY_MS / 2, (name, seen)
    kinds = {f.kind: f for f in result.findings}
    assert "latency-on-faulted-replica" in kinds, result.findings
    finding = kinds["latency-on-faulted-replica"]
    assert faulted.replica_id in finding.text
    assert set(finding.evidence) >= {faulted.replica_id}
    qdiscs_after = await asyncio.to_thread(qdisc_kinds, faulted.netns, INTERFACE)
    print(f"KERNEL {faulted.netns} {INTERFACE} qdiscs after the run: {qdiscs_after}")
    assert qdiscs_after == qdiscs_before
    # The proxy keeps an emptied table while connections it relayed drain
    # (the other replicas' gossip keeps theirs open for up to the engine's
    # 10 min grace): no redirect may be left; the table goes at agent exit.
    ruleset = run_in(faulted.netns, "nft", "list", "ruleset").stdout
    assert "redirect" not in ruleset, ruleset


def test_teardown_leaves_nothing(latency_lab: LatencyLab) -> None:
    """Test that once the agents exit (SIGTERM) no aftershock nft table or
    qdisc is left in any node's namespace, and that closing the lab deletes
    every namespace it made (the fixture closes it again; that is harmless)."""
    names = [n.netns for n in latency_lab.nodes if n.netns]
    assert names and all(netns_exists(n) for n in names)

    for agent in latency_lab.agents:
        assert agent.terminate() == 0, agent.log()[-2000:]
    left = {n: [t for t in nft_tables(n) if "aftershock" in t] for n in names}
    qdiscs = {n: qdisc_kinds(n, INTERFACE) for n in names}
    latency_lab.lab.close()

    print(f"KERNEL after agent exit: nft {left}, qdiscs {qdiscs}")
    assert not any(left.values()), left
    assert all(kinds == ["noqueue"] for kinds in qdiscs.values()), qdiscs
    assert not any(netns_exists(n) for n in names)
