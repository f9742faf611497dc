"""The coordinator's view of the fleet, built from what agents retain.

Every agent keeps a retained `Status` on its status topic (its last will turns
it to `online: false`), and the coordinator keeps retained `Halt`s. A snapshot
subscribes, takes what the broker replays, and stops as soon as the replay
goes quiet, so `aftershock agents` costs a fraction of a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Final

import structlog

from chaos_agent import wire
from coordinator.mqtt import Received, Transport

log = structlog.get_logger(__name__)

# Retained messages follow the SUBACK within milliseconds on a local broker;
# 150 ms of quiet means the replay is over, 1.5 s caps a slow or huge one.
SETTLE_S: Final = 0.15
MAX_WAIT_S: Final = 1.5

HALT_WILDCARD: Final = f"{wire.TOPIC_ROOT}/+/halt"


@dataclass(frozen=True)
class AgentView:
    """One agent as last seen: its status and, when watched, its telemetry."""

    status: wire.Status
    telemetry: wire.Telemetry | None = None

    @property
    def node(self) -> str:
        return self.status.node

    @property
    def site(self) -> str:
        return self.status.site

    @property
    def online(self) -> bool:
        return self.status.online

    @property
    def labels(self) -> dict[str, str]:
        return self.status.labels

    def can_run(self, fault_type: str) -> bool:
        return fault_type in self.status.capabilities.faults

    def missing_reason(self, fault_type: str) -> str | None:
        """Why this agent cannot run `fault_type`, as it reported it."""
        return self.status.capabilities.missing.get(fault_type)


@dataclass
class FleetView:
    """Agents by (site, node) and the retained halts (None: the global one)."""

    agents: dict[tuple[str, str], AgentView] = field(default_factory=dict)
    halts: dict[str | None, wire.Halt] = field(default_factory=dict)

    def apply(self, message: Received) -> bool:
        """Take in one received message; return whether it changed the view."""
        topic = message.topic
        if topic == wire.halt_topic():
            return self._apply_halt(None, message.payload)
        try:
            site, node, kind = wire.split_node_topic(topic)
        except wire.WireError:
            if topic.endswith("/halt") and topic.count("/") == 3:
                return self._apply_halt(topic.split("/")[2], message.payload)
            return False

        if kind == "status":
            return self._apply_status(site, node, message.payload)
        if kind == "telemetry":
            return self._apply_telemetry(site, node, message.payload)
        return False

    def _apply_status(self, site: str, node: str, payload: bytes) -> bool:
        # An empty retained payload is how a status is cleared for good.
        if not payload:
            return self.agents.pop((site, node), None) is not None
        try:
            status = wire.decode(wire.Status, payload)
        except wire.WireError as exc:
            log.warning("status_ignored", site=site, node=node, error=str(exc))
            return False
        if (status.site, status.node) != (site, node):
            log.warning(
                "status_ignored",
                site=site,
                node=node,
                error=f"claims to be {status.site}/{status.node}",
            )
            return False

        previous = self.agents.get((site, node))
        telemetry = previous.telemetry if previous else None
        self.agents[(site, node)] = AgentView(status, telemetry)
        return True

    def _apply_telemetry(self, site: str, node: str, payload: bytes) -> bool:
        previous = self.agents.get((site, node))
        if previous is None:
            # Telemetry without a status is an agent we cannot describe yet.
            return False
        try:
            sample = wire.decode(wire.Telemetry, payload)
        except wire.WireError as exc:
            log.warning("telemetry_ignored", site=site, node=node, error=str(exc))
            return False
        self.agents[(site, node)] = replace(previous, telemetry=sample)
        return True

    def _apply_halt(self, site: str | None, payload: bytes) -> bool:
        if not payload:
            return self.halts.pop(site, None) is not None
        try:
            halt = wire.decode(wire.Halt, payload)
        except wire.WireError as exc:
            log.warning("halt_ignored", site=site, error=str(exc))
            return False
        self.halts[site] = halt
        return True

    def halt_for(self, site: str) -> wire.Halt | None:
        """The halt in force for `site`: the global one first, then the site's."""
        for scope in (None, site):
            halt = self.halts.get(scope)
            if halt is not None and halt.halted:
                return halt
        return None

    def sorted_agents(self, site: str | None = None) -> list[AgentView]:
        chosen = [a for a in self.agents.values() if site is None or a.site == site]
        return sorted(chosen, key=lambda a: (a.site, a.node))

    def active_faults(
        self, site: str | None = None
    ) -> Iterator[tuple[AgentView, wire.ActiveFault]]:
        for agent in self.sorted_agents(site):
            for fault in agent.status.faults:
                yield agent, fault


def fleet_topics(site: str | None = None) -> list[str]:
    """What a snapshot subscribes to: statuses (of one site) and halts."""
    status = wire.STATUS_WILDCARD if site is None else wire.status_topic(site, "+")
    return [status, wire.halt_topic(), HALT_WILDCARD]


async def collect(
    view: FleetView,
    next_message: Callable[[], Awaitable[Received]],
    *,
    settle_s: float = SETTLE_S,
    max_wait_s: float = MAX_WAIT_S,
) -> FleetView:
    """Apply messages from `next_message` to `view` until the replay has gone
    quiet, and for `max_wait_s` at the latest.

    Quiet means no message for `settle_s`, or for three times the longest gap
    seen so far if that is longer: a broker starved of CPU (a Python broker on
    a busy node) can pause mid-replay, and a fixed window would cut it short.
    `next_message` must lose nothing when cancelled (a timeout).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_wait_s
    quiet_s = settle_s
    last = loop.time()
    while (remaining := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(
                next_message(), timeout=min(quiet_s, remaining)
            )
        except TimeoutError:
            break
        now = loop.time()
        quiet_s = max(quiet_s, 3 * (now - last))
        last = now
        view.apply(message)
    return view


async def snapshot(
    transport: Transport,
    *,
    site: str | None = None,
    settle_s: float = SETTLE_S,
    max_wait_s: float = MAX_WAIT_S,
) -> FleetView:
    """The fleet as the broker's retained statuses and halts describe it.

    The transport must have no other reader meanwhile; `Coordinator.snapshot`
    shares one connection instead.
    """
    await transport.subscribe(*fleet_topics(site))
    return await collect(
        FleetView(), transport.receive, settle_s=settle_s, max_wait_s=max_wait_s
    )


async def telemetry_samples(
    transport: Transport, site: str | None = None
) -> AsyncIterator[wire.Telemetry]:
    """Every telemetry sample the agents (of `site`) publish, as it arrives."""
    topic = wire.TELEMETRY_WILDCARD if site is None else wire.telemetry_topic(site, "+")
    await transport.subscribe(topic)
    while True:
        message = await transport.receive()
        try:
            yield wire.decode(wire.Telemetry, message.payload)
        except wire.WireError as exc:
            log.warning("telemetry_ignored", topic=message.topic, error=str(exc))
