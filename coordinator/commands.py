"""Resolve targets, publish commands, collect acks, keep leases alive.

The async library API under the `aftershock` CLI and the experiment engine::

    async with connector() as transport, Coordinator(transport) as coordinator:
        fleet = await coordinator.snapshot()
        plan = plan_inject(fleet, request)           # refuses, sends nothing
        async with coordinator.inject(plan) as injection:
            if injection.all_applied:
                await injection.hold()               # renews the lease
        # leaving the block reverts whatever is still applied

One inject is one `wire.Command` (its id is also the fault id on every
agent) addressed to the exact nodes resolved here and published on each
node's own topic, so every node's outcome arrives, and is reported, on its
own ack topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final, Literal, Protocol, TypeVar

import structlog
from pydantic import ValidationError

from chaos_agent import wire
from coordinator.fleet import AgentView, FleetView, collect, fleet_topics
from coordinator.mqtt import ConnectionLost, Received, Transport

log = structlog.get_logger(__name__)

FaultSpec = (
    wire.CpuFault
    | wire.MemoryFault
    | wire.LatencyFault
    | wire.BandwidthFault
    | wire.PartitionFault
    | wire.CorruptStateFault
    | wire.ProcessFault
)

# How long an agent may still act on a command after it was issued: long
# enough for a slow broker bridge, short enough to make replays worthless.
COMMAND_VALIDITY_S: Final = 30.0
ACK_TIMEOUT_S: Final = 10.0
# After the duration, agents revert on their own clocks; this is how long the
# coordinator waits for them to say so before sending an explicit revert.
REVERT_GRACE_S: Final = 10.0
REVERT_TIMEOUT_S: Final = 5.0


# ------------------------------------------------------------------ signing

SignedMessage = TypeVar("SignedMessage", wire.Command, wire.LeaseRenewal, wire.Halt)


class Signer(Protocol):
    def __call__(self, message: SignedMessage, /) -> SignedMessage: ...


def sign(message: SignedMessage) -> SignedMessage:
    """The signer used when no signing key is given: sends the envelope as is.

    Agents refuse unsigned commands unless started with
    `--insecure-allow-unsigned`; pass `--signing-key` (see `key_signer`).
    """
    return message


def key_signer(private_key: wire.PrivateKey) -> Signer:
    """A signer that puts an Ed25519 signature on every envelope."""

    def signer(message: SignedMessage) -> SignedMessage:
        return wire.sign(message, private_key)

    return signer


# ------------------------------------------------------------------- errors


class Refused(Exception):
    """The coordinator will not send this command; the text says why.

    Nothing was published. The CLI prints the text as one line and exits 2.
    """


class NoMatchingAgent(Refused):
    pass


class FleetHalted(Refused):
    pass


class MissingCapability(Refused):
    pass


class InvalidRequest(ValueError):
    """A request whose values the wire models refuse; the text says which."""


def describe_validation_error(what: str, exc: ValidationError) -> str:
    """One line naming each bad field of `what` and the reason."""
    problems = []
    for error in exc.errors(include_url=False)[:3]:
        where = ".".join(str(p) for p in error["loc"] if not isinstance(p, int))
        reason = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {reason}" if where else reason)
    more = exc.error_count() - len(problems)
    tail = f" (and {more} more)" if more > 0 else ""
    return f"invalid {what}: " + "; ".join(problems) + tail


# ---------------------------------------------------------------- targeting


@dataclass(frozen=True)
class Selector:
    """Which agents to address: all of these constrain, none means every one.

    `count` or `percent` then picks a random sample of the matching online
    agents; `seed` makes the sample reproducible.
    """

    nodes: tuple[str, ...] = ()
    site: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    count: int | None = None
    percent: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.count is not None and self.percent is not None:
            msg = "give --count or --percent, not both"
            raise InvalidRequest(msg)
        if self.count is not None and self.count < 1:
            msg = f"--count must be at least 1, not {self.count}"
            raise InvalidRequest(msg)
        if self.percent is not None and not 0 < self.percent <= 100:
            msg = f"--percent must be more than 0 and at most 100, not {self.percent:g}"
            raise InvalidRequest(msg)

    def describe(self) -> str:
        parts = [f"node {n}" for n in self.nodes]
        parts += [f"site {self.site}"] if self.site else []
        parts += [f"{k}={v}" for k, v in sorted(self.labels.items())]
        return ", ".join(parts) or "any node"


def resolve_targets(
    fleet: FleetView, selector: Selector, fault_type: str | None = None
) -> list[AgentView]:
    """The online agents `selector` picks, or `Refused` naming the reason.

    Refuses when no online agent matches, when a named node is unknown,
    ambiguous or offline, when the fleet or a target's site is halted, and
    when a matching agent cannot run `fault_type` (checked before sampling,
    so the same request always refuses or never does).
    """
    candidates = fleet.sorted_agents(selector.site)
    for name in selector.nodes:
        _check_named_node(candidates, name, selector.site)

    matching = [
        agent
        for agent in candidates
        if agent.online
        and (not selector.nodes or agent.node in selector.nodes)
        and all(agent.labels.get(k) == v for k, v in selector.labels.items())
    ]
    if not matching:
        online = sum(1 for a in candidates if a.online)
        msg = f"no online agent matches {selector.describe()} ({online} online"
        msg += f" in site {selector.site})" if selector.site else " in the fleet)"
        raise NoMatchingAgent(msg)

    if fault_type is not None:
        _check_not_halted(fleet, matching)
        _check_capable(matching, fault_type)
    return _sample(matching, selector)


def _check_named_node(candidates: list[AgentView], name: str, site: str | None) -> None:
    found = [a for a in candidates if a.node == name]
    where = f" in site {site}" if site else ""
    if not found:
        msg = f"no agent named {name!r}{where}: `aftershock agents` lists them"
        raise NoMatchingAgent(msg)
    if len(found) > 1:
        sites = ", ".join(a.site for a in found)
        msg = f"node {name!r} exists in sites {sites}: add --site to pick one"
        raise NoMatchingAgent(msg)
    if not found[0].online:
        seen = found[0].status.at.isoformat(timespec="seconds")
        msg = f"agent {found[0].site}/{name} is offline (last status {seen})"
        raise NoMatchingAgent(msg)


def _check_not_halted(fleet: FleetView, targets: list[AgentView]) -> None:
    for agent in targets:
        global_halt = fleet.halts.get(None)
        site_halt = fleet.halts.get(agent.site)
        if global_halt is not None and global_halt.halted:
            scope, reason, resume = "the fleet is", global_halt.reason, "resume"
        elif site_halt is not None and site_halt.halted:
            scope, reason = f"site {agent.site} is", site_halt.reason
            resume = f"resume --site {agent.site}"
        elif agent.status.halted:
            # The agent saw a halt this snapshot did not: trust the agent.
            scope = f"agent {agent.site}/{agent.node} reports it is"
            reason, resume = agent.status.halt_reason, "resume"
        else:
            continue
        because = f" ({reason})" if reason else ""
        msg = f"{scope} halted{because}: run `aftershock {resume}` first"
        raise FleetHalted(msg)


def _check_capable(targets: list[AgentView], fault_type: str) -> None:
    for agent in targets:
        if agent.can_run(fault_type):
            continue
        reason = agent.missing_reason(fault_type) or "it does not report the capability"
        msg = (
            f"agent {agent.site}/{agent.node} cannot run {fault_type} faults: "
            f"{reason}; narrow the targets with --node or --select"
        )
        raise MissingCapability(msg)


def _check_latency_engine(targets: list[AgentView], engine: str) -> None:
    """Refuse a latency engine a target lacks. An agent reports latency as
    available when either engine works, so the fault type alone says too
    little when the operator names the engine."""
    if engine == "auto":
        return
    for agent in targets:
        if engine in agent.status.capabilities.latency_engines:
            continue
        if engine == "netem":
            how = (
                "its kernel has no sch_netem: load the module (modprobe sch_netem) "
                "or use --engine proxy (TCP only, per stream)"
            )
        else:
            how = "the proxy engine needs nftables with nat redirect on the node"
        msg = (
            f"agent {agent.site}/{agent.node} cannot run latency faults with "
            f"engine {engine}: {how}"
        )
        raise MissingCapability(msg)


def _sample(matching: list[AgentView], selector: Selector) -> list[AgentView]:
    if selector.count is not None:
        wanted = selector.count
        if wanted > len(matching):
            msg = (
                f"--count {wanted} asks for more agents than the "
                f"{len(matching)} online ones matching {selector.describe()}"
            )
            raise NoMatchingAgent(msg)
    elif selector.percent is not None:
        wanted = max(1, math.ceil(len(matching) * selector.percent / 100))
    else:
        return matching

    chosen = random.Random(selector.seed).sample(matching, wanted)
    return sorted(chosen, key=lambda a: (a.site, a.node))


# --------------------------------------------------------------------- plans


@dataclass(frozen=True)
class InjectRequest:
    fault: FaultSpec
    duration_s: float
    lease_s: float
    experiment: str
    selector: Selector = Selector()
    validity_s: float = COMMAND_VALIDITY_S


@dataclass(frozen=True)
class InjectPlan:
    """A resolved, signed inject command and the exact agents it goes to."""

    command: wire.Command
    targets: tuple[AgentView, ...]
    duration_s: float
    lease_s: float

    @property
    def fault_id(self) -> str:
        return str(self.command.id)


def plan_inject(
    fleet: FleetView, request: InjectRequest, signer: Signer = sign
) -> InjectPlan:
    """Resolve `request` against `fleet` into one command, or refuse."""
    targets = resolve_targets(fleet, request.selector, request.fault.type)
    if isinstance(request.fault, wire.LatencyFault):
        _check_latency_engine(targets, request.fault.engine)
    command = build_command(
        "inject",
        targets,
        experiment=request.experiment,
        validity_s=request.validity_s,
        fault=request.fault,
        duration_s=request.duration_s,
        lease_s=request.lease_s,
    )
    return InjectPlan(
        signer(command), tuple(targets), request.duration_s, request.lease_s
    )


def build_command(
    action: Literal["inject", "revert", "revert_all", "ping"],
    targets: list[AgentView] | tuple[AgentView, ...],
    *,
    experiment: str,
    validity_s: float = COMMAND_VALIDITY_S,
    fault: FaultSpec | None = None,
    fault_id: str | None = None,
    duration_s: float | None = None,
    lease_s: float | None = None,
) -> wire.Command:
    """A command for exactly `targets`, or `InvalidRequest` naming the field."""
    issued_at = wire.utcnow()
    target = wire.Target(
        sites=sorted({a.site for a in targets}), nodes=[a.node for a in targets]
    )
    try:
        return wire.Command.model_validate(
            {
                "issued_at": issued_at,
                "expires_at": issued_at + timedelta(seconds=validity_s),
                "experiment": experiment,
                "action": action,
                "target": target,
                "fault": fault,
                "fault_id": fault_id,
                "duration_s": duration_s,
                "lease_s": lease_s,
            }
        )
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error("command", exc)) from None


# ---------------------------------------------------------------- outcomes

InjectState = Literal["pending", "received", "applied", "rejected", "failed", "timeout"]
# absent: the agent had no such fault when asked to revert (it never applied
# it, or already reverted it and its ack was missed).
RevertState = Literal["reverted", "absent", "failed", "timeout"]


@dataclass
class NodeResult:
    """What one node did with an inject, from its acks."""

    site: str
    node: str
    state: InjectState = "pending"
    reason: str | None = None
    revert_state: RevertState | None = None
    revert_cause: str | None = None
    detail: dict[str, object] = field(default_factory=dict)
    # Agent-side milliseconds from receiving the command to applying it.
    applied_ms: float | None = None

    @property
    def settled(self) -> bool:
        """The inject phase is over for this node."""
        return self.state in ("applied", "rejected", "failed", "timeout")

    @property
    def needs_revert(self) -> bool:
        """The fault may still be in place on this node."""
        return self.state in ("applied", "pending", "received", "timeout") and (
            self.revert_state in (None, "timeout")
        )

    def take(self, ack: wire.Ack) -> None:
        """Advance on `ack`; acks of one node arrive in order (QoS 1, one topic)."""
        if ack.state == "received":
            if self.state == "pending":
                self.state = "received"
        elif ack.state == "applied":
            self.state = "applied"
            self.detail = ack.detail
            self.applied_ms = ack.timings.elapsed_ms
        elif ack.state == "rejected":
            self.state, self.reason = "rejected", ack.reason
        elif ack.state == "reverted":
            # A short fault can be reverted before its applied ack was read.
            if not self.settled or self.state == "timeout":
                self.state = "applied"
            self.revert_state, self.revert_cause = "reverted", ack.revert_cause
        elif self.state == "applied":
            self.revert_state, self.reason = "failed", ack.reason
        else:
            self.state, self.reason = "failed", ack.reason


# ------------------------------------------------------------- coordinator


class _Inbox:
    """One listener's copy of everything the connection receives."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Received | None] = asyncio.Queue()

    def put(self, message: Received | None) -> None:
        self._queue.put_nowait(message)

    async def get(self) -> Received:
        message = await self._queue.get()
        if message is None:
            self._queue.put_nowait(None)
            msg = "the broker connection was lost"
            raise ConnectionLost(msg)
        return message


class Coordinator:
    """The coordinator's side of one broker connection.

    One task reads the connection and hands every message to each listener,
    so snapshots and several injections can share the connection.
    """

    def __init__(self, transport: Transport, *, signer: Signer = sign) -> None:
        self.transport = transport
        self.signer = signer
        self._inboxes: list[_Inbox] = []
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Coordinator:
        self._reader = asyncio.create_task(self._dispatch(), name="coordinator-reader")
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _dispatch(self) -> None:
        try:
            while True:
                message = await self.transport.receive()
                for inbox in self._inboxes:
                    inbox.put(message)
        except ConnectionLost:
            log.error("broker_connection_lost")
            for inbox in self._inboxes:
                inbox.put(None)

    @contextmanager
    def listen(self) -> Iterator[_Inbox]:
        inbox = _Inbox()
        self._inboxes.append(inbox)
        try:
            yield inbox
        finally:
            self._inboxes.remove(inbox)

    async def publish(
        self, topic: str, message: wire.WireModel, *, retain: bool = False
    ) -> None:
        await self.transport.publish(topic, wire.encode(message), qos=1, retain=retain)

    async def snapshot(self, site: str | None = None) -> FleetView:
        """The fleet as the broker's retained statuses and halts describe it."""
        with self.listen() as inbox:
            await self.transport.subscribe(*fleet_topics(site))
            return await collect(FleetView(), inbox.get)

    async def halt(self, reason: str = "", site: str | None = None) -> wire.Halt:
        """Retain a halt: agents revert everything and refuse new faults."""
        halt = self.signer(wire.Halt(halted=True, reason=reason))
        await self.publish(wire.halt_topic(site), halt, retain=True)
        log.info("halt_published", site=site or "*", reason=reason)
        return halt

    async def resume(self, site: str | None = None) -> wire.Halt:
        """Replace the retained halt of `site` (or the global one) with a resume."""
        resume = self.signer(wire.Halt(halted=False))
        await self.publish(wire.halt_topic(site), resume, retain=True)
        log.info("resume_published", site=site or "*")
        return resume

    def inject(
        self, plan: InjectPlan, *, ack_timeout_s: float = ACK_TIMEOUT_S
    ) -> Injection:
        """An injection of `plan`; `async with` it to publish and wait until
        every target applied, refused or timed out. Leaving the block (or an
        error or cancellation while waiting) reverts whatever may still be
        applied, unless the injection was detached."""
        return Injection(self, plan, ack_timeout_s=ack_timeout_s)


class Injection:
    """One inject in flight: per-node results, the lease, the revert."""

    def __init__(
        self,
        coordinator: Coordinator,
        plan: InjectPlan,
        *,
        ack_timeout_s: float = ACK_TIMEOUT_S,
    ) -> None:
        self.coordinator = coordinator
        self.plan = plan
        self.ack_timeout_s = ack_timeout_s
        self._collector: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._listening: contextlib.ExitStack | None = None
        self.results = {
            (a.site, a.node): NodeResult(a.site, a.node) for a in plan.targets
        }
        self.detached = False
        self._revert_ids: set[uuid.UUID] = set()
        self._changed = asyncio.Condition()
        self._log = log.bind(
            command_id=plan.fault_id,
            experiment=plan.command.experiment,
            fault=plan.command.fault.type if plan.command.fault else None,
        )

    async def __aenter__(self) -> Injection:
        self._listening = contextlib.ExitStack()
        inbox = self._listening.enter_context(self.coordinator.listen())
        self._collector = asyncio.create_task(self.collect(inbox), name="acks")
        try:
            await self.publish(self.ack_timeout_s)
        except BaseException:
            # `async with` does not call __aexit__ when __aenter__ fails.
            await self._close()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._close()

    async def _close(self) -> None:
        self._stop_renewing()
        try:
            if not self.detached:
                await self.revert(self.ack_timeout_s)
        finally:
            for task in (self._renewer, self._collector):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if self._listening is not None:
                self._listening.close()

    @property
    def all_applied(self) -> bool:
        return all(r.state == "applied" for r in self.results.values())

    @property
    def all_reverted(self) -> bool:
        return not any(r.needs_revert for r in self.results.values())

    async def collect(self, inbox: _Inbox) -> None:
        """Apply every ack of this fault to its node's result, until cancelled."""
        fault_id = self.plan.command.id
        while True:
            message = await inbox.get()
            if not message.topic.endswith("/ack"):
                continue
            try:
                ack = wire.decode(wire.Ack, message.payload)
            except wire.WireError as exc:
                self._log.warning("ack_ignored", topic=message.topic, error=str(exc))
                continue
            result = self.results.get((ack.site, ack.node))
            if result is None:
                continue
            if ack.command_id in self._revert_ids and ack.state == "rejected":
                result.revert_state, result.reason = "absent", ack.reason
            elif fault_id in (ack.command_id, ack.fault_id):
                result.take(ack)
            else:
                continue

            self._log.info(
                "ack", node=ack.node, site=ack.site, state=ack.state, reason=ack.reason
            )
            async with self._changed:
                self._changed.notify_all()

    async def _wait_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(done)
        except TimeoutError:
            return False
        return True

    async def publish(self, ack_timeout_s: float = ACK_TIMEOUT_S) -> None:
        """Subscribe to the targets' acks, publish the command to each target,
        and wait for every node to settle; silent ones become `timeout`."""
        coordinator = self.coordinator
        sites = sorted({a.site for a in self.plan.targets})
        # Subscribed before publishing, so no fast ack can be missed.
        await coordinator.transport.subscribe(*(wire.ack_topic(s, "+") for s in sites))
        for agent in self.plan.targets:
            topic = wire.command_topic(agent.site, agent.node)
            await coordinator.publish(topic, self.plan.command)
        self._log.info("inject_published", targets=len(self.plan.targets))
        self._renewer = asyncio.create_task(self._renew_lease_forever(), name="lease")

        settled = await self._wait_until(
            lambda: all(r.settled for r in self.results.values()), ack_timeout_s
        )
        if not settled:
            for result in self.results.values():
                if not result.settled:
                    result.state = "timeout"
                    result.reason = (
                        f"no ack in time (waited {ack_timeout_s:g}s); a slow node "
                        "may still apply it: it is sent a revert, and its lease "
                        f"({self.plan.lease_s:g}s) ends it otherwise; raise the "
                        "ack timeout for slow nodes"
                    )
            self._log.warning("inject_timeout", silent=self.silent_nodes())

    def silent_nodes(self) -> list[str]:
        return [r.node for r in self.results.values() if r.state == "timeout"]

    async def hold(
        self,
        duration_s: float | None = None,
        *,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        """Stay for `duration_s` (the fault's by default) while the lease is
        renewed; return early once every node has reverted (a halt, say). Then
        wait a grace period for the agents' own duration reverts."""
        duration_s = self.plan.duration_s if duration_s is None else duration_s
        loop = asyncio.get_running_loop()
        started = loop.time()

        while (now := loop.time()) < started + duration_s:
            if progress is not None:
                progress(now - started)
            step = min(0.25, started + duration_s - now)
            if await self._wait_until(lambda: self.all_reverted, step):
                self._log.info("reverted_early")
                return
        if progress is not None:
            progress(duration_s)
        await self._wait_until(lambda: self.all_reverted, REVERT_GRACE_S)

    async def _renew_lease_forever(self) -> None:
        """Renew every third of the lease from the moment the command is out,
        so a slow apply cannot outlast the first lease."""
        experiment = self.plan.command.experiment
        while True:
            await asyncio.sleep(self.plan.lease_s / 3)
            renewal = wire.LeaseRenewal(
                experiment=experiment, lease_s=self.plan.lease_s
            )
            try:
                await self.coordinator.publish(
                    wire.lease_topic(experiment), self.coordinator.signer(renewal)
                )
            except ConnectionLost as exc:
                # Without renewals the agents revert within the lease: safe.
                self._log.warning("lease_renewal_stopped", error=str(exc))
                return

    def _stop_renewing(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()

    def detach(self) -> None:
        """Leave the fault to the agents' own duration: no renewals, no revert
        on exit. The plan's lease must cover its duration."""
        self.detached = True
        self._stop_renewing()

    async def revert(self, timeout_s: float = REVERT_TIMEOUT_S) -> None:
        """Ask every node that may still hold the fault to revert it, and wait
        for their reverted acks; silent nodes become `timeout`."""
        pending = [r for r in self.results.values() if r.needs_revert]
        if not pending:
            return

        targets = [
            a for a in self.plan.targets if self.results[(a.site, a.node)] in pending
        ]
        revert = build_command(
            "revert",
            targets,
            experiment=self.plan.command.experiment,
            fault_id=self.plan.fault_id,
        )
        revert = self.coordinator.signer(revert)
        self._revert_ids.add(revert.id)
        for agent in targets:
            topic = wire.command_topic(agent.site, agent.node)
            await self.coordinator.publish(topic, revert)
        self._log.info("revert_published", targets=len(targets))

        if not await self._wait_until(lambda: self.all_reverted, timeout_s):
            for result in pending:
                if result.needs_revert:
                    result.revert_state = "timeout"
            # The agents' leases still revert it, unless the fault was detached.
            self._log.warning(
                "revert_unconfirmed",
                nodes=[r.node for r in pending if r.revert_state == "timeout"],
            )
