"""A scripted stand-in for a chaos agent, for coordinator tests.

It speaks the wire protocol (retained status, acks for commands) but applies
nothing: `respond` maps one incoming message to the messages a real agent
would publish. `MemoryBroker` (unit tests) and `run_on_broker` (integration
tests, a real aiomqtt client) both drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import aiomqtt

from chaos_agent import wire
from coordinator.mqtt import NODELAY

Outgoing = tuple[str, bytes, bool]  # topic, payload, retain
Behaviour = Literal["apply", "reject", "fail", "silent"]


@dataclass
class ScriptedAgent:
    node: str
    site: str = "lab"
    labels: dict[str, str] = field(default_factory=dict)
    faults: list[str] = field(default_factory=lambda: list(wire.FAULT_TYPES))
    missing: dict[str, str] = field(default_factory=dict)
    latency_engines: list[Literal["netem", "proxy"]] = field(
        default_factory=lambda: ["netem", "proxy"]
    )
    online: bool = True
    behaviour: Behaviour = "apply"
    reason: str = "max_duration_s is 60s on this agent"
    # Revert on the fault's own duration, as a real agent does.
    revert_after_duration: bool = True
    # A slow node: its answers to a command leave this late (run_on_broker).
    ack_delay_s: float = 0.0
    commands: list[wire.Command] = field(default_factory=list)
    renewals: list[wire.LeaseRenewal] = field(default_factory=list)

    def status(self, active: list[wire.ActiveFault] | None = None) -> wire.Status:
        return wire.Status(
            node=self.node,
            site=self.site,
            online=self.online,
            labels=self.labels,
            capabilities=wire.Capabilities(
                faults=self.faults,
                missing=self.missing,
                latency_engines=self.latency_engines,
            ),
            faults=active or [],
        )

    def status_message(self) -> Outgoing:
        topic = wire.status_topic(self.site, self.node)
        return topic, wire.encode(self.status()), True

    def subscriptions(self) -> list[str]:
        return wire.agent_subscriptions(self.site, self.node)

    def respond(self, topic: str, payload: bytes) -> list[Outgoing]:
        """What this agent publishes on receiving `payload` on `topic`."""
        if topic.startswith(f"{wire.TOPIC_ROOT}/lease/"):
            self.renewals.append(wire.decode(wire.LeaseRenewal, payload))
            return []
        if not topic.endswith("/cmd"):
            return []
        command = wire.decode(wire.Command, payload)
        if not command.target.matches(self.site, self.node, self.labels):
            return []
        self.commands.append(command)
        if self.behaviour == "silent":
            return []

        if command.action == "inject":
            return self._answer_inject(command)
        if command.action == "revert":
            return [self.ack(command, "reverted", fault_id=command.fault_id,
                             revert_cause="command")]  # fmt: skip
        return [self.ack(command, "applied")]

    def _answer_inject(self, command: wire.Command) -> list[Outgoing]:
        received = self.ack(command, "received")
        if self.behaviour == "reject":
            return [received, self.ack(command, "rejected", reason=self.reason)]
        if self.behaviour == "fail":
            return [received, self.ack(command, "failed", reason="driver exploded")]
        applied = self.ack(command, "applied", detail={"verified": True})
        return [received, applied]

    def ack(
        self,
        command: wire.Command,
        state: wire.AckState,
        *,
        fault_id: object = None,
        reason: str | None = None,
        revert_cause: wire.RevertCause | None = None,
        detail: dict[str, object] | None = None,
    ) -> Outgoing:
        now = wire.utcnow()
        ack = wire.Ack(
            command_id=command.id,
            node=self.node,
            site=self.site,
            experiment=command.experiment,
            state=state,
            fault_id=fault_id or (command.id if command.action == "inject" else None),
            fault_type=command.fault.type if command.fault else None,
            reason=reason,
            revert_cause=revert_cause,
            detail=detail or {},
            timings=wire.Timings(received_at=now, at=now, elapsed_ms=0.5),
        )
        return wire.ack_topic(self.site, self.node), wire.encode(ack), False

    def duration_revert(self, command: wire.Command) -> Outgoing:
        """The ack a real agent sends when the fault's duration ends."""
        return self.ack(
            command, "reverted", fault_id=command.id, revert_cause="duration"
        )


def active_fault(command: wire.Command) -> wire.ActiveFault:
    """The status entry a real agent would report for an applied inject."""
    now = wire.utcnow()
    assert command.fault is not None and command.duration_s is not None
    return wire.ActiveFault(
        fault_id=command.id,
        type=command.fault.type,
        experiment=command.experiment,
        applied_at=now,
        expires_at=now + timedelta(seconds=command.duration_s),
        lease_expires_at=now + timedelta(seconds=command.lease_s or 0),
    )


async def run_on_broker(agent: ScriptedAgent, host: str, port: int) -> None:
    """Serve `agent` on a real broker until cancelled: retained status (with a
    last will), acks for commands, and duration reverts on time."""
    will = aiomqtt.Will(
        wire.status_topic(agent.site, agent.node),
        wire.encode(agent.status().model_copy(update={"online": False})),
        qos=1,
        retain=True,
    )
    async with aiomqtt.Client(
        host, port, identifier=f"scripted-{agent.site}-{agent.node}", will=will,
        socket_options=[NODELAY],
    ) as client:  # fmt: skip
        await client.subscribe([(t, 1) for t in agent.subscriptions()])
        topic, payload, retain = agent.status_message()
        await client.publish(topic, payload, qos=1, retain=retain)

        timers: dict[object, asyncio.Task[None]] = {}
        try:
            async for message in client.messages:
                raw = bytes(message.payload) if message.payload else b""
                seen = len(agent.commands)
                answers = agent.respond(str(message.topic), raw)
                if answers and agent.ack_delay_s:
                    await asyncio.sleep(agent.ack_delay_s)
                for out_topic, out_payload, out_retain in answers:
                    await client.publish(
                        out_topic, out_payload, qos=1, retain=out_retain
                    )
                if len(agent.commands) == seen:
                    continue
                command = agent.commands[-1]
                if command.action == "revert" and command.fault_id in timers:
                    timers.pop(command.fault_id).cancel()
                elif (
                    command.action == "inject"
                    and agent.behaviour == "apply"
                    and agent.revert_after_duration
                ):
                    revert = _revert_later(client, agent, command)
                    timers[command.id] = asyncio.create_task(revert)
        finally:
            for timer in timers.values():
                timer.cancel()


async def _revert_later(
    client: aiomqtt.Client, agent: ScriptedAgent, command: wire.Command
) -> None:
    assert command.duration_s is not None
    await asyncio.sleep(command.duration_s)
    topic, payload, _ = agent.duration_revert(command)
    with contextlib.suppress(aiomqtt.MqttError):
        await client.publish(topic, payload, qos=1)
