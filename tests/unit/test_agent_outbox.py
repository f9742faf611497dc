"""The outbox: order kept, only the newest retained status, bounded."""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
import pytest

from chaos_agent.agent import Agent, Outbox, Outgoing, Session


def test_newest_status_replaces_older_ones() -> None:
    """Test that a retained message replaces a waiting one on the same topic
    while acks keep their order."""
    outbox = Outbox()
    outbox.put(Outgoing("status", b"old", retain=True))
    outbox.put(Outgoing("ack", b"1"))
    outbox.put(Outgoing("status", b"new", retain=True))
    outbox.put(Outgoing("ack", b"2"))

    assert [m.payload for m in outbox.drain()] == [b"1", b"new", b"2"]


def test_full_outbox_drops_the_oldest() -> None:
    """Test that beyond its limit the outbox drops the oldest message."""
    outbox = Outbox(limit=3)
    for number in range(5):
        outbox.put(Outgoing("ack", str(number).encode()))

    assert [m.payload for m in outbox.drain()] == [b"2", b"3", b"4"]


async def test_failed_publish_goes_back_to_the_head() -> None:
    """Test that a message whose publish failed is sent first next time, and
    that flushed() waits for it."""
    outbox = Outbox()
    outbox.put(Outgoing("ack", b"1"))
    outbox.put(Outgoing("ack", b"2"))

    first = await outbox.get()
    outbox.put_back(first)
    again = await outbox.get()
    outbox.done()

    assert again.payload == b"1"
    assert [m.payload for m in outbox.drain()] == [b"2"]
    await outbox.flushed()


class BrokerThatStalls:
    """A stand-in for aiomqtt.Client.publish: confirms the first `confirm`
    messages at once, holds the rest until `lose()` fails them all."""

    def __init__(self, confirm: int) -> None:
        self.confirm = confirm
        self.started: list[bytes] = []
        self.most_in_flight = 0
        self._in_flight = 0
        self._lost = asyncio.Event()
        self.stalled = asyncio.Event()

    async def publish(self, topic: str, payload: bytes, **_: Any) -> None:
        self.started.append(payload)
        if len(self.started) <= self.confirm:
            return
        self._in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self._in_flight)
        if self._in_flight == 3:
            self.stalled.set()
        await self._lost.wait()
        msg = "connection lost"
        raise aiomqtt.MqttError(msg)

    def lose(self) -> None:
        self._lost.set()


async def test_sender_pipelines_and_requeues_the_unconfirmed_in_order(
    agent: Agent,
) -> None:
    """Test that the sender keeps several publishes in flight, starts them in
    the outbox's order, and on a lost connection puts every unconfirmed one
    back at the head, still in order, before raising a bare MqttError."""
    broker = BrokerThatStalls(confirm=2)
    for number in range(5):
        agent.outbox.put(Outgoing("ack", str(number).encode()))
    session = Session(agent)

    sender = asyncio.create_task(session._send(broker))  # type: ignore[arg-type]
    await asyncio.wait_for(broker.stalled.wait(), 5)
    broker.lose()
    with pytest.raises(aiomqtt.MqttError):
        await asyncio.wait_for(sender, 5)

    assert broker.started == [b"0", b"1", b"2", b"3", b"4"]
    assert broker.most_in_flight == 3
    assert [m.payload for m in agent.outbox.drain()] == [b"2", b"3", b"4"]
