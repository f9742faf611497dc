"""Tests of deploy/mosquitto: mutual TLS and the ACL, on a real Mosquitto.

The config and ACL shipped in deploy/ are used as they are, with only the
listener port and certificate paths rewritten for the test.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from tests.brokers import Broker
from tests.tls import Issued, TestCA, deployed_mosquitto

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


@pytest.fixture
def secure_broker(tmp_path: Path, ca: TestCA) -> Iterator[Broker]:
    with deployed_mosquitto(tmp_path, ca) as broker:
        yield broker


def _tls(ca: TestCA, client: Issued | None) -> aiomqtt.TLSParameters:
    return aiomqtt.TLSParameters(
        ca_certs=str(ca.cert),
        certfile=str(client.cert) if client else None,
        keyfile=str(client.key) if client else None,
        cert_reqs=ssl.CERT_REQUIRED,
    )


def _client(
    broker: Broker, ca: TestCA, who: Issued | None, ident: str
) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=ident,
        tls_params=_tls(ca, who),
        timeout=5,
    )


async def _delivered(
    broker: Broker,
    ca: TestCA,
    publisher: Issued,
    topic: str,
    *,
    listener: Issued,
) -> bool:
    """Publish from `publisher` and report whether `listener` received it."""
    async with _client(broker, ca, listener, "listener") as sub:
        await sub.subscribe(topic, qos=1)
        async with _client(broker, ca, publisher, "publisher") as pub:
            await pub.publish(topic, b"{}", qos=1)
        try:
            async with asyncio.timeout(1.0):
                async for _ in sub.messages:
                    return True
        except TimeoutError:
            return False
    return False


async def test_client_without_certificate_is_refused(
    secure_broker: Broker, ca: TestCA
) -> None:
    """Test that the broker refuses a TLS client that shows no certificate."""
    with pytest.raises(aiomqtt.MqttError):
        async with _client(secure_broker, ca, None, "anonymous"):
            pass


async def test_agent_publishes_under_its_own_node_only(
    secure_broker: Broker, ca: TestCA
) -> None:
    """Test that an agent's status reaches the coordinator, but the same agent
    cannot publish as another node."""
    coordinator = ca.issue("aftershock-coordinator")
    agent = ca.issue("edge-1")

    own = "aftershock/v1/site-a/edge-1/status"
    other = "aftershock/v1/site-a/edge-2/status"

    assert await _delivered(secure_broker, ca, agent, own, listener=coordinator)
    assert not await _delivered(secure_broker, ca, agent, other, listener=coordinator)


@pytest.mark.parametrize(
    "topic",
    [
        "aftershock/v1/site-a/edge-2/cmd",
        "aftershock/v1/site-a/_all/cmd",
        "aftershock/v1/_all/_all/cmd",
        "aftershock/v1/halt",
        "aftershock/v1/lease/exp-1",
    ],
)
async def test_agent_credentials_cannot_command_other_agents(
    secure_broker: Broker, ca: TestCA, topic: str
) -> None:
    """Test that an agent's credentials cannot publish commands, halts or
    leases that another agent would receive."""
    attacker = ca.issue("edge-1")
    victim = ca.issue("edge-2")

    assert not await _delivered(secure_broker, ca, attacker, topic, listener=victim)


async def test_coordinator_commands_reach_the_agent(
    secure_broker: Broker, ca: TestCA
) -> None:
    """Test the positive case, so the refusals above are not a broken setup."""
    coordinator = ca.issue("aftershock-coordinator")
    agent = ca.issue("edge-2")

    topic = "aftershock/v1/site-a/edge-2/cmd"
    assert await _delivered(secure_broker, ca, coordinator, topic, listener=agent)
