"""A network fault through the whole chain: CLI -> broker -> agent -> kernel.

`aftershock inject bandwidth` against a real `chaos-agent run` and a real
Mosquitto; the agent is SIGKILLed mid-fault, so the qdisc outlives it, and a
restarted agent removes it from its journal before it subscribes. (The netem
version of this runs in the kernel tier.)
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent_process import session_key, started_agent
from tests.brokers import Broker
from tests.integration.network_lab import (
    Lab,
    owned_qdiscs,
    tcp_sink,
    throughput_kbit,
    two_namespaces,
)

pytestmark = [pytest.mark.integration, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def lab() -> Iterator[Lab]:
    with two_namespaces(subnet=3) as lab:
        yield lab


async def wait_until(predicate: Callable[[], bool], within_s: float) -> bool:
    for _ in range(int(within_s * 10)):
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return bool(predicate())


async def start_inject(broker: Broker, *fault: str) -> asyncio.subprocess.Process:
    """`aftershock inject ...` as a subprocess (it renews the lease while it
    runs)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator.cli", "--broker", broker.url,
        "--signing-key", str(session_key().private_path),
        "inject", *fault, "--node", "edge-1", "--duration", "120s",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def test_cli_bandwidth_survives_agent_sigkill_until_restart(
    lab: Lab, mosquitto: Broker, tmp_path: Path
) -> None:
    """Test that a CLI-injected tbf caps throughput, outlives a SIGKILLed
    agent, and is gone once the agent restarts."""
    async with started_agent(mosquitto.url, tmp_path) as agent:
        inject = await start_inject(
            mosquitto, "bandwidth", "--rate", "4mbit",
            "--netns", lab.ns_a, "--interface", lab.if_a,
        )  # fmt: skip
        try:
            applied = await wait_until(lambda: owned_qdiscs(lab.ns_a) != [], 60)
            with tcp_sink(lab.ns_b, lab.addr_b) as sink:
                during = throughput_kbit(lab.ns_a, lab.addr_b, sink)
            agent.kill()
            after_kill = owned_qdiscs(lab.ns_a)
        finally:
            if inject.returncode is None:
                inject.kill()
            output, _ = await inject.communicate()
        await agent.start()
        gone = await wait_until(lambda: owned_qdiscs(lab.ns_a) == [], 60)

    print(f"\ncli bandwidth 4 mbit: measured {during:.0f} kbit/s")
    assert applied, output.decode()
    assert 4000 * 0.5 < during < 4000 * 1.5
    assert after_kill != []
    assert gone
