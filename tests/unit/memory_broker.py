"""An in-memory MQTT broker with scripted agents, for coordinator unit tests.

It keeps retained messages, matches wildcards, and records every publish, so
a test can assert what the coordinator sent without a network. It is a
`Connector` for `CliDeps` and `Coordinator`, not a stand-in for MQTT
semantics beyond that (no QoS, no sessions).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiomqtt import Topic

from chaos_agent import wire
from coordinator.mqtt import BrokerUnreachable, ConnectionLost, Received, Transport
from tests.scripted_agent import ScriptedAgent


@dataclass(frozen=True)
class Published:
    topic: str
    payload: bytes
    retain: bool


@dataclass
class MemoryBroker:
    agents: list[ScriptedAgent] = field(default_factory=list)
    retained: dict[str, bytes] = field(default_factory=dict)
    published: list[Published] = field(default_factory=list)
    clients: list[MemoryTransport] = field(default_factory=list)
    # Set to make the next connection fail as an unreachable broker would.
    unreachable: bool = False
    # Called with the filters of every subscription, after retained delivery:
    # a test publishes "live" messages from here.
    on_subscribe: Callable[[tuple[str, ...]], None] | None = None

    def add(self, agent: ScriptedAgent) -> ScriptedAgent:
        self.agents.append(agent)
        topic, payload, retain = agent.status_message()
        self.publish(topic, payload, retain=retain, record=False)
        return agent

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, record: bool = True
    ) -> None:
        if record:
            self.published.append(Published(topic, payload, retain))
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        for client in self.clients:
            client.deliver(Received(topic, payload, retain=False))
        for agent in self.agents:
            answers = agent.respond(topic, payload)
            for out_topic, out_payload, out_retain in answers:
                self.publish(out_topic, out_payload, retain=out_retain, record=False)
            if answers and agent.behaviour == "apply" and agent.revert_after_duration:
                self._revert_on_duration(agent, agent.commands[-1])

    def _revert_on_duration(self, agent: ScriptedAgent, command: wire.Command) -> None:
        if command.action != "inject" or command.duration_s is None:
            return
        out_topic, out_payload, _ = agent.duration_revert(command)
        asyncio.get_running_loop().call_later(
            command.duration_s, self.publish, out_topic, out_payload
        )

    def commands(self) -> list[tuple[str, wire.Command]]:
        """Every command the coordinator published, with its topic."""
        return [
            (p.topic, wire.decode(wire.Command, p.payload))
            for p in self.published
            if p.topic.endswith("/cmd")
        ]

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Transport]:
        if self.unreachable:
            msg = "cannot connect to the broker at mqtt://memory (refused)"
            raise BrokerUnreachable(msg)
        client = MemoryTransport(self)
        self.clients.append(client)
        try:
            yield client
        finally:
            self.clients.remove(client)


class MemoryTransport:
    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.filters: list[str] = []
        self.inbox: asyncio.Queue[Received | None] = asyncio.Queue()

    def deliver(self, message: Received) -> None:
        if any(Topic(message.topic).matches(f) for f in self.filters):
            self.inbox.put_nowait(message)

    async def subscribe(self, *topic_filters: str) -> None:
        self.filters.extend(topic_filters)
        for topic, payload in self.broker.retained.items():
            if any(Topic(topic).matches(f) for f in topic_filters):
                self.inbox.put_nowait(Received(topic, payload, retain=True))
        if self.broker.on_subscribe is not None:
            self.broker.on_subscribe(topic_filters)

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        self.broker.publish(topic, payload, retain=retain)

    async def receive(self) -> Received:
        message = await self.inbox.get()
        if message is None:
            msg = "the broker connection was lost"
            raise ConnectionLost(msg)
        return message
