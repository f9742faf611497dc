"""A real agent on the Mosquitto of deploy/mosquitto: mutual TLS, identity
from the certificate's CN, the shipped ACL."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from tests.agent_process import AgentProcess, command, sweep_journal, wait_status
from tests.brokers import Broker
from tests.tls import Issued, TestCA, deployed_mosquitto

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.root]


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


@pytest.fixture
def secure_broker(tmp_path: Path, ca: TestCA) -> Iterator[Broker]:
    with deployed_mosquitto(tmp_path, ca) as broker:
        yield broker


def coordinator_tls(ca: TestCA) -> aiomqtt.TLSParameters:
    """The test side connects as the coordinator identity the ACL names."""
    coordinator = ca.issue("aftershock-coordinator")
    return aiomqtt.TLSParameters(
        ca_certs=str(ca.cert),
        certfile=str(coordinator.cert),
        keyfile=str(coordinator.key),
        cert_reqs=ssl.CERT_REQUIRED,
    )


def tls_agent(
    broker: Broker,
    ca: TestCA,
    tmp_path: Path,
    client: Issued | None,
) -> AgentProcess:
    tls_args = ["--ca", str(ca.cert)]
    if client is not None:
        tls_args += ["--cert", str(client.cert), "--key", str(client.key)]
    return AgentProcess(
        f"mqtts://{broker.host}:{broker.port}",
        tmp_path / "state",
        node="edge-1",
        extra_args=tls_args,
        client_tls=coordinator_tls(ca),
    )


async def test_agent_with_certificate_comes_online_and_answers(
    secure_broker: Broker, ca: TestCA, tmp_path: Path
) -> None:
    """Test that an agent with a client certificate (CN = its node name)
    connects over mutual TLS, reports itself online and answers a signed ping
    under the shipped ACL."""
    agent = tls_agent(secure_broker, ca, tmp_path, ca.issue("edge-1"))
    try:
        status = await agent.start()
        answer = await agent.send(command("ping"))
    finally:
        agent.terminate()
        await sweep_journal(agent.state_dir)

    assert status.online
    assert answer[-1].state == "applied"


async def test_agent_without_certificate_is_refused_and_says_why(
    secure_broker: Broker, ca: TestCA, tmp_path: Path
) -> None:
    """Test that an agent without a client certificate is refused by the
    broker: it keeps running and retrying, logs why, and never shows online."""
    agent = tls_agent(secure_broker, ca, tmp_path, None)
    agent.spawn()
    try:
        with pytest.raises(TimeoutError):
            await wait_status(
                agent.broker_url,
                agent.site,
                agent.node,
                lambda status: status.online,
                within_s=6,
                tls=agent.client_tls,
            )
        for _ in range(200):  # each attempt may take the 10 s connect timeout
            refusals = [
                e for e in agent.log_events() if e["event"] == "broker_unreachable"
            ]
            if len(refusals) >= 2:
                break
            await asyncio.sleep(0.2)
        running = agent.running
    finally:
        agent.terminate()

    assert running
    assert len(refusals) >= 2  # it retries
    assert "--cert" in refusals[0]["hint"]
    assert refusals[0]["level"] == "warning"
