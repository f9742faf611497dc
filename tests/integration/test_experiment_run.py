"""Whole experiments against a real lab: Mosquitto, three token-bucket
replicas and three real agents, all subprocesses of the test.

Each test's lab is torn down in fixtures (agents get SIGTERM and their
journals are swept; replicas are stopped by pid), also when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from coordinator.commands import Signer, key_signer
from coordinator.experiment import (
    Experiment,
    Progress,
    parse_experiment,
    run_experiment,
)
from coordinator.mqtt import BrokerSettings, Connector, mqtt_connector
from tests.agent_process import AgentProcess, session_key, sweep_journal
from tests.brokers import Broker
from tests.replicas import Cluster, running_replicas

pytestmark = [pytest.mark.integration, pytest.mark.root]


@dataclass
class Lab:
    broker: Broker
    cluster: Cluster
    agents: list[AgentProcess]

    def endpoints(self) -> str:
        return "\n".join(
            f"    - {{name: {r.replica_id}, url: '{r.url}', node: edge-{i}}}"
            for i, r in enumerate(self.cluster)
        )

    def experiment(self, body: str) -> Experiment:
        text = textwrap.dedent(body).replace("ENDPOINTS", self.endpoints().strip())
        return parse_experiment(text)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    # capacity 100, refilling 1 token/s: a 100 s window, so counters do not
    # age out (and hide drift) during a test.
    with running_replicas(tmp_path / "replicas", count=3, buckets=("*=100/1",)) as c:
        yield c


@pytest.fixture
async def lab(
    mosquitto: Broker, cluster: Cluster, tmp_path: Path
) -> AsyncIterator[Lab]:
    policy = json.dumps([str(tmp_path / "replicas")])
    agents = [
        AgentProcess(
            mosquitto.url,
            tmp_path / f"agent-{i}" / "state",
            node=f"edge-{i}",
            labels={"role": "bucket"},
            env={"CHAOS_AGENT_POLICY__ALLOWED_STATE_PATHS": policy},
        )
        for i in range(3)
    ]
    try:
        await asyncio.gather(*(a.start() for a in agents))
        yield Lab(mosquitto, cluster, agents)
    finally:
        for agent in agents:
            agent.terminate()
            await sweep_journal(agent.state_dir)


def _signer() -> Signer:
    """Signs with the key the test agents trust."""
    return key_signer(session_key().private)


def _connector(lab: Lab) -> Connector:
    return mqtt_connector(BrokerSettings.from_url(lab.broker.url))


async def test_cpu_fault_violates_nothing_and_the_run_passes(
    lab: Lab, tmp_path: Path
) -> None:
    """Test that a mild CPU fault on one node keeps every SLO, the verdict
    holds, and the report shows the applied fault."""
    experiment = lab.experiment(
        """
        name: cpu-mild
        system:
          endpoints:
            ENDPOINTS
        load: {rate: 60, keys: {count: 20}}
        hypothesis: {p99_ms: 1000}
        steady_state: 2s
        recovery: {max: 10s, stable_for: 1s}
        method:
          - name: squeeze
            faults:
              - type: cpu
                params: {load_percent: 30, workers: 1}
                target: {nodes: [edge-0]}
                duration: 4s
              - type: latency
                name: netem-only
                params: {delay_ms: 50, engine: netem}
                target: {nodes: [edge-1]}
                duration: 4s
        """
    )

    result = await run_experiment(
        experiment, _connector(lab), report_dir=tmp_path / "r", signer=_signer()
    )

    assert result.outcome == "held", (result.reason, result.verdicts, result.findings)
    assert result.exit_code == 0
    window, skipped = sorted(result.windows, key=lambda w: w.type)
    assert (window.type, window.nodes, window.replicas) == ("cpu", ("edge-0",), ("r0",))
    assert window.end is not None and window.end - window.start >= 3.5
    # This kernel has no netem: the agent refuses, the run goes on without it.
    assert skipped.skipped is not None and "netem" in skipped.skipped
    assert any(f.kind == "fault-skipped" for f in result.findings)
    # The service's own counters agree that load reached every replica.
    assert set(result.service) == {"r0", "r1", "r2"}
    assert all(f["allowed"] + f["limited"] > 0 for f in result.service.values())
    events = [e.event for e in result.events]
    assert events.index("fault_applied") < events.index("fault_reverted")
    assert (tmp_path / "r" / "junit.xml").exists()


async def test_corruption_left_unrepaired_violates_drift(lab: Lab) -> None:
    """Test that corrupting a replica's bucket state while its gossip is
    down leaves drift over target, the verdict fails, and the finding
    blames the state fault on that replica."""
    corrupted = lab.cluster[1]
    experiment = lab.experiment(
        f"""
        name: corrupt-r1
        system:
          endpoints:
            ENDPOINTS
        load: {{rate: 60, duration: 3s, keys: {{count: 4}}}}
        hypothesis: {{p99_ms: 1000}}
        warmup: 1s
        steady_state: 2s
        recovery: {{max: 3s}}
        drift: {{keys: 4, interval: 500ms}}
        method:
          - name: corrupt
            faults:
              - type: corrupt-state
                params: {{path: "{corrupted.state_path}", mode: set, value: 0}}
                target: {{nodes: [edge-1]}}
                duration: 2s
        """
    )

    cut: list[str] = []

    def cut_gossip_when_faults_start(progress: Progress) -> None:
        # Simulates a replica its peers cannot repair. Called as the phase
        # begins, before the inject is sent; blocking the loop for one local
        # HTTP call keeps the order certain.
        if progress.stage == "corrupt" and not cut:
            corrupted.set_gossip_paused(True)
            cut.append(progress.stage)

    result = await run_experiment(
        experiment,
        _connector(lab),
        progress=cut_gossip_when_faults_start,
        signer=_signer(),
    )

    verdicts = {v.slo: v for v in result.verdicts}
    assert result.outcome == "violated", (result.reason, result.windows)
    ended = [e for e in result.events if e.event == "run_ended"]
    assert [e.fields["outcome"] for e in ended] == ["violated"]
    assert result.exit_code == 1
    assert not verdicts["drift after recovery"].held
    assert (verdicts["drift after recovery"].observed or 0) > 10
    kinds = {f.kind: f for f in result.findings}
    assert "drift-after-state-fault" in kinds
    assert kinds["drift-after-state-fault"].evidence.get("replica") == "r1"


async def test_abort_condition_fires_and_reverts_within_one_check(lab: Lab) -> None:
    """Test that pausing a replica makes requests time out, the error-rate
    abort fires within about one check interval of the evidence, the pause
    is reverted (the replica runs again) and the outcome is `aborted`."""
    paused = lab.cluster[0]
    experiment = lab.experiment(
        f"""
        name: abort-on-errors
        system:
          endpoints:
            ENDPOINTS
        load: {{rate: 100, timeout: 500ms, keys: {{count: 10}}}}
        hypothesis: {{p99_ms: 1000}}
        # The abort is the subject: a busy machine's steady state is not.
        require_steady_state: false
        steady_state: 2s
        check_interval: 500ms
        abort:
          - {{metric: error_rate_pct, above: 5, window: 1s}}
        method:
          - name: freeze
            faults:
              - type: process
                params: {{action: pause, pid: {paused.pid}}}
                target: {{nodes: [edge-0]}}
                duration: 60s
        """
    )

    started = time.monotonic()
    result = await run_experiment(experiment, _connector(lab), signer=_signer())

    assert result.outcome == "aborted", (result.reason, result.windows)
    assert result.exit_code == 1
    assert time.monotonic() - started < 30
    assert psutil.Process(paused.pid).status() != psutil.STATUS_STOPPED
    failures = sorted(r.done_at for r in result.records if r.failed)
    abort = next(e for e in result.events if e.event == "abort")
    # Evidence piles up from the first failure; the check that sees enough
    # of it runs at most one interval later (plus the window's fill time).
    assert abort.t - failures[0] < 1.0 + 0.5 + 1.0
    reverted = next(e for e in result.events if e.event == "fault_reverted")
    assert reverted.t - abort.t < 6.0


def test_killed_coordinator_faults_revert_by_lease(lab: Lab, tmp_path: Path) -> None:
    """Test that SIGKILLing the coordinator mid-run leaves a paused replica
    paused only until the lease runs out, then the agent resumes it."""
    paused = lab.cluster[2]
    experiment_file = tmp_path / "lease.yaml"
    experiment_file.write_text(
        textwrap.dedent(
            f"""
            name: lease-test
            system:
              endpoints:
                ENDPOINTS
            load: {{rate: 20, timeout: 300ms}}
            hypothesis: {{p99_ms: 1000}}
            steady_state: 1s
            lease: 3s
            abort: []
            method:
              - name: freeze
                faults:
                  - type: process
                    params: {{action: pause, pid: {paused.pid}}}
                    target: {{nodes: [edge-2]}}
                    duration: 120s
            """
        ).replace("ENDPOINTS", lab.endpoints().strip())
    )
    argv = [
        sys.executable,
        "-m",
        "coordinator.cli",
        "--broker",
        lab.broker.url,
        "--signing-key",
        str(session_key().private_path),
        "run",
        str(experiment_file),
        "--json",
        "--report",
        str(tmp_path / "report"),
    ]
    log = (tmp_path / "coordinator.log").open("wb")
    coordinator = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _stopped(paused.pid), 30, "the replica was never paused")
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(timeout=10)
        killed_at = time.monotonic()

        _wait(lambda: not _stopped(paused.pid), 15, "the pause outlived its lease")

        assert time.monotonic() - killed_at < 3.0 + 5.0
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
            coordinator.wait()
        log.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(paused.pid, signal.SIGCONT)


def _stopped(pid: int) -> bool:
    return psutil.Process(pid).status() == psutil.STATUS_STOPPED


def _wait(done: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.05)
    raise AssertionError(message)


def test_ctrl_c_reverts_at_once_and_still_reports(lab: Lab, tmp_path: Path) -> None:
    """Test that SIGINT to `aftershock run` resumes a paused replica well
    before its lease would, exits 1, and leaves a report of the run."""
    paused = lab.cluster[1]
    experiment_file = tmp_path / "interrupt.yaml"
    experiment_file.write_text(
        textwrap.dedent(
            f"""
            name: interrupt-test
            system:
              endpoints:
                ENDPOINTS
            load: {{rate: 20, timeout: 300ms}}
            require_steady_state: false
            steady_state: 1s
            lease: 60s
            abort: []
            method:
              - name: freeze
                faults:
                  - type: process
                    params: {{action: pause, pid: {paused.pid}}}
                    target: {{nodes: [edge-1]}}
                    duration: 120s
            """
        ).replace("ENDPOINTS", lab.endpoints().strip())
    )
    report = tmp_path / "report"
    argv = [sys.executable, "-m", "coordinator.cli", "--broker", lab.broker.url]
    argv += ["--signing-key", str(session_key().private_path)]
    argv += ["run", str(experiment_file), "--report", str(report)]
    log = (tmp_path / "coordinator.log").open("wb")
    coordinator = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _stopped(paused.pid), 30, "the replica was never paused")
        coordinator.send_signal(signal.SIGINT)
        _wait(lambda: not _stopped(paused.pid), 10, "SIGINT left the pause in place")
        code = coordinator.wait(timeout=30)
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
            coordinator.wait()
        log.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(paused.pid, signal.SIGCONT)

    assert code == 1, (tmp_path / "coordinator.log").read_text()[-2000:]
    journal = json.loads((report / "journal.json").read_text())
    assert journal["outcome"] == "aborted"
    assert "interrupted" in [e["event"] for e in journal["events"]]
