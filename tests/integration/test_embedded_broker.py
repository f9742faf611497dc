"""The embedded broker (`aftershock broker`): what the wire protocol relies on."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import pytest

from coordinator.mqtt import NODELAY
from tests.brokers import Broker, free_port, wait_for_port

pytestmark = pytest.mark.integration


def client(broker: Broker, **options: object) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        socket_options=[NODELAY],
        **options,  # type: ignore[arg-type]
    )


async def first_message(
    client: aiomqtt.Client, within_s: float = 5.0
) -> aiomqtt.Message:
    async with asyncio.timeout(within_s):
        async for message in client.messages:
            return message
    raise AssertionError("unreachable")


async def test_retained_message_reaches_a_late_subscriber(
    embedded_broker: Broker,
) -> None:
    """Test that a retained message published before anyone subscribed is
    delivered, flagged retained, to a subscriber that comes later."""
    async with client(embedded_broker) as publisher:
        await publisher.publish("aftershock/v1/halt", b'{"x":1}', qos=1, retain=True)

    async with client(embedded_broker) as late:
        await late.subscribe("aftershock/v1/#", qos=1)
        message = await first_message(late)

    assert str(message.topic) == "aftershock/v1/halt"
    assert message.payload == b'{"x":1}'
    assert message.retain


async def test_empty_retained_payload_clears_it(embedded_broker: Broker) -> None:
    """Test that publishing an empty retained payload removes the retained message."""
    async with client(embedded_broker) as publisher:
        await publisher.publish("t/status", b"on", qos=1, retain=True)
        await publisher.publish("t/status", b"", qos=1, retain=True)

    async with client(embedded_broker) as late:
        await late.subscribe("t/#", qos=1)
        with pytest.raises(TimeoutError):
            await first_message(late, within_s=0.5)


async def test_new_client_gets_only_retained_messages_it_subscribed_to(
    embedded_broker: Broker,
) -> None:
    """Test that a client receives, once each, only the retained messages of its
    own subscriptions, while another client holds a wider one (amqtt 0.12
    replayed every client's filters to each new connection)."""
    async with client(embedded_broker) as publisher:
        await publisher.publish("aftershock/v1/lab/n1/status", b"s", qos=1, retain=True)
        await publisher.publish("aftershock/v1/halt", b"h", qos=1, retain=True)

    async with client(embedded_broker) as wide:
        await wide.subscribe("aftershock/v1/#", qos=1)
        async with client(embedded_broker) as narrow:
            await narrow.subscribe("aftershock/v1/halt", qos=1)
            received = []
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):
                    async for message in narrow.messages:
                        received.append((str(message.topic), message.payload))

    assert received == [("aftershock/v1/halt", b"h")]


async def test_qos1_round_trip(embedded_broker: Broker) -> None:
    """Test that a QoS 1 command reaches a subscriber and its QoS 1 answer comes
    back, as a command and its ack do."""
    async with client(embedded_broker) as agent, client(embedded_broker) as coordinator:
        await agent.subscribe("cmd", qos=1)
        await coordinator.subscribe("ack", qos=1)

        async def answer() -> None:
            message = await first_message(agent)
            assert message.qos == 1
            await agent.publish("ack", b"ok:" + bytes(message.payload), qos=1)  # type: ignore[arg-type]

        answering = asyncio.create_task(answer())
        await coordinator.publish("cmd", b"42", qos=1)
        reply = await first_message(coordinator)
        await answering

    assert reply.payload == b"ok:42"
    assert reply.qos == 1


async def test_last_will_is_retained_when_a_client_dies(
    embedded_broker: Broker, tmp_path: Path
) -> None:
    """Test that a client killed without disconnecting leaves its retained last
    will, the way an agent's status turns offline."""
    script = tmp_path / "dying_client.py"
    script.write_text(
        "import asyncio, aiomqtt\n"
        "async def main():\n"
        f"    will = aiomqtt.Will('a/status', b'offline', qos=1, retain=True)\n"
        f"    async with aiomqtt.Client('{embedded_broker.host}', "
        f"{embedded_broker.port}, will=will, keepalive=5) as c:\n"
        "        await c.publish('a/status', b'online', qos=1, retain=True)\n"
        "        print('ready', flush=True)\n"
        "        await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    dying = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert dying.stdout is not None
        async with asyncio.timeout(30):
            assert (await dying.stdout.readline()).strip() == b"ready"
    finally:
        dying.kill()
        await dying.wait()

    async with client(embedded_broker) as observer:
        await observer.subscribe("a/status", qos=1)
        async with asyncio.timeout(10):
            async for message in observer.messages:
                if message.payload == b"offline":
                    break


def start_broker(*args: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "broker", *args,
         "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    return process, port


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def test_sigterm_shuts_down_cleanly(embedded_broker: Broker) -> None:
    """Test that SIGTERM ends the broker promptly with exit status 0."""
    embedded_broker.process.send_signal(signal.SIGTERM)
    started = time.monotonic()

    assert embedded_broker.process.wait(timeout=10) == 0
    assert time.monotonic() - started < 5


async def test_password_file_refuses_anonymous_and_wrong_passwords(
    tmp_path: Path,
) -> None:
    """Test that with --password-file only a listed user with the right password
    may connect."""
    passwords = tmp_path / "passwords"
    adding = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator.cli", "broker-user", str(passwords), "ops",
        env={"AFTERSHOCK_NEW_PASSWORD": "s3cret", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert await adding.wait() == 0
    process, port = start_broker("--password-file", str(passwords))
    try:
        wait_for_port("127.0.0.1", port)
        for username, password in ((None, None), ("ops", "wrong")):
            with pytest.raises(aiomqtt.MqttError):
                async with aiomqtt.Client(
                    "127.0.0.1", port, username=username, password=password
                ):
                    pass
        async with aiomqtt.Client("127.0.0.1", port, username="ops", password="s3cret"):
            pass
    finally:
        stop(process)


def test_open_broker_on_a_network_address_is_refused() -> None:
    """Test that listening beyond loopback without a password file is refused,
    with a one-line reason and exit status 2, and nothing listens."""
    port = free_port()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "broker",
            "--listen",
            f"0.0.0.0:{port}",
        ],
        capture_output=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert b"--password-file" in result.stderr
    assert b"--allow-anonymous" in result.stderr
