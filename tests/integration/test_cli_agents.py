"""End to end: the `aftershock` CLI commanding real agents (`chaos-agent run`).

CPU faults with one worker at low load keep the 2-CPU test machines usable.
The agents trust the test session's key, and the CLI signs with it
(`--signing-key`), as in production.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.agent_process import AckCollector, session_key, started_agent, wait_status
from tests.brokers import Broker

pytestmark = [pytest.mark.integration, pytest.mark.root]


async def start_cli(broker: Broker, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator.cli", "--broker", broker.url,
        "--signing-key", str(session_key().private_path), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def finish(
    process: asyncio.subprocess.Process, within_s: float
) -> tuple[int, str]:
    try:
        async with asyncio.timeout(within_s):
            stdout, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode()


async def test_inject_cpu_applied_and_reverted_after_duration(
    mosquitto: Broker, tmp_path: Path
) -> None:
    """Test that `inject cpu` through the CLI is applied by a real agent, held for
    its duration and reverted by it, exit 0, leaving no active fault."""
    async with started_agent(mosquitto.url, tmp_path, node="edge-1") as agent:
        cli = await start_cli(
            mosquitto, "inject", "cpu", "--load", "10", "--workers", "1",
            "--duration", "3s", "--lease", "3s", "--json",
        )  # fmt: skip
        code, stdout = await finish(cli, within_s=60)

        assert code == 0, stdout
        [result] = json.loads(stdout)["results"]
        assert (result["node"], result["state"]) == ("edge-1", "applied")
        assert (result["revert_state"], result["revert_cause"]) == (
            "reverted",
            "duration",
        )
        status = await wait_status(
            mosquitto.url, agent.site, agent.node, lambda s: not s.faults
        )
        assert status.online


async def test_status_shows_the_lease_as_renewed(
    mosquitto: Broker, tmp_path: Path
) -> None:
    """Test that while `inject` holds a fault and renews its 3 s lease every
    second, `aftershock status --json` read well after the first lease would
    have run out shows a lease that still has time left."""
    async with started_agent(mosquitto.url, tmp_path, node="edge-1"):
        holder = await start_cli(
            mosquitto, "inject", "cpu", "--load", "5", "--workers", "1",
            "--duration", "30s", "--lease", "3s", "--json",
        )  # fmt: skip
        try:
            await asyncio.sleep(6.0)
            status = await start_cli(mosquitto, "status", "--json")
            code, stdout = await finish(status, within_s=60)
        finally:
            holder.send_signal(signal.SIGINT)
            await finish(holder, within_s=60)

    assert code == 0, stdout
    [fault] = json.loads(stdout)
    assert fault["node"] == "edge-1"
    assert 0.5 < fault["lease_expires_in_s"] <= 3.0, fault


async def test_killed_coordinator_fault_reverted_by_lease(
    mosquitto: Broker, tmp_path: Path
) -> None:
    """Test that when the `aftershock inject` process is SIGKILLed mid-fault, the
    agent reverts the fault itself once the lease runs out, long before its
    duration would."""
    lease_s = 3.0
    async with (
        started_agent(mosquitto.url, tmp_path, node="edge-1") as agent,
        AckCollector(mosquitto.url, agent.site, agent.node) as acks,
    ):
        cli = await start_cli(
            mosquitto, "inject", "cpu", "--load", "10", "--workers", "1",
            "--duration", "10m", "--lease", f"{lease_s:g}s",
        )  # fmt: skip
        try:
            applied = await acks.wait_for(
                lambda seen: any(a.state == "applied" for a in seen), within_s=60
            )
            # Renewals keep it alive while the coordinator lives.
            await asyncio.sleep(lease_s * 1.5)
            assert not [a for a in acks.acks if a.state == "reverted"]
        finally:
            cli.send_signal(signal.SIGKILL)
            await cli.wait()
        killed_at = time.monotonic()

        fault_id = next(a.fault_id for a in applied if a.state == "applied")
        assert isinstance(fault_id, uuid.UUID)
        reverted = await acks.wait_for(
            lambda seen: any(a.state == "reverted" for a in seen), within_s=30
        )

        [revert] = [a for a in reverted if a.state == "reverted"]
        assert revert.fault_id == fault_id
        assert revert.revert_cause == "lease"
        assert time.monotonic() - killed_at < lease_s + 10


async def test_interrupted_inject_reverts_and_exits_130(
    mosquitto: Broker, tmp_path: Path
) -> None:
    """Test that Ctrl-C (SIGINT) during `inject` sends a revert, reports it and
    exits 130."""
    async with (
        started_agent(mosquitto.url, tmp_path, node="edge-1") as agent,
        AckCollector(mosquitto.url, agent.site, agent.node) as acks,
    ):
        cli = await start_cli(
            mosquitto, "inject", "cpu", "--load", "10", "--workers", "1",
            "--duration", "10m", "--json",
        )  # fmt: skip
        await acks.wait_for(lambda seen: any(a.state == "applied" for a in seen), 60)
        cli.send_signal(signal.SIGINT)
        code, stdout = await finish(cli, within_s=30)

    assert code == 130
    [result] = json.loads(stdout)["results"]
    assert (result["revert_state"], result["revert_cause"]) == ("reverted", "command")
