"""Tests of deploy/mosquitto: mutual TLS and the ACL, on a real Mosquitto.

The config and ACL shipped in deploy/ are used as they are, with only the
listener port and certificate paths rewritten for the test.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from tests.brokers import Broker, free_port, start_mosquitto
from tests.tls import Issued, TestCA

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


@pytest.fixture
def secure_broker(tmp_path: Path, ca: TestCA) -> Iterator[Broker]:
    """Mosquitto running deploy/mosquitto/mosquitto.conf and its ACL."""
    port = free_port()
    server = ca.issue("broker", server=True)
    acl = tmp_path / "acl"
    acl.write_text((ROOT / "deploy" / "mosquitto" / "acl").read_text())

    config = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    config = re.sub(
        r"^listener 8883$", f"listener {port} 127.0.0.1", config, flags=re.M
    )
    config = config.replace("/etc/mosquitto/certs/ca.crt", str(ca.cert))
    config = config.replace("/etc/mosquitto/certs/broker.crt", str(server.cert))
    config = config.replace("/etc/mosquitto/certs/broker.key", str(server.key))
    config = config.replace("/etc/mosquitto/acl", str(acl))
    assert str(port) in config and str(acl) in config
    # Started as root, Mosquitto would drop to its own user, which cannot read
    # pytest's private temporary directory.
    config += "user root\n"

    broker = start_mosquitto(tmp_path, port=port, raw_config=config)
    try:
        yield broker
    finally:
        broker.stop()


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
