"""The agent: command dispatch, leases, halt, journal, MQTT session, shutdown.

Two parts, so that the rules can be tested without a broker:

- `Agent` owns the faults and the safety invariants. It takes messages
  (`handle(topic, payload)`, never blocking), runs apply and revert as tasks
  serialized per fault, enforces duration and lease deadlines on the
  monotonic clock (`enforce_deadlines`), and puts everything it has to say
  (acks, status) into its `Outbox`.
- `Session` holds the MQTT connection: it feeds messages to the agent,
  drains the outbox, publishes telemetry, and reconnects with backoff. Faults
  stay governed by their deadlines while the broker is away.

`run_agent` wires both together with the metrics server and signal handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import itertools
import json
import math
import random
import signal
import socket
import ssl
import sys
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import aiomqtt
import structlog

from chaos_agent import __version__, halt_memory, wire
from chaos_agent.capabilities import DriverFactory, capabilities_of, inspect_node
from chaos_agent.faults import UnknownFaultType, load_driver
from chaos_agent.faults.base import (
    Availability,
    FaultContext,
    FaultDriver,
    FaultFailed,
    FaultRejected,
    Record,
)
from chaos_agent.journal import Journal, JournalEntry, JournalError
from chaos_agent.policy import PolicyViolation
from chaos_agent.settings import AgentSettings, SettingsError, parse_listen
from chaos_agent.telemetry import Metrics, MetricsServer, record_sample, sample

# Drivers verify before they return (a memory fault waits for its bytes to be
# resident, up to ~100 s for tens of GiB); an apply slower than this failed.
APPLY_TIMEOUT_S = 180.0

# A revert that raises is tried this many times, `REVERT_RETRY_S * attempt`
# apart, before the fault is reported stuck (it stays in the journal).
REVERT_ATTEMPTS = 3
REVERT_RETRY_S = 1.0
# One revert attempt may take this long; a driver that hangs longer is
# treated as failed for that attempt.
REVERT_TIMEOUT_S = 30.0

# Replay protection remembers command ids until they expire (at most
# wire.MAX_COMMAND_VALIDITY_S after issue). The cap bounds memory under a
# flood; when it is full, new commands are refused rather than old ids
# forgotten (forgetting would let a recorded command be replayed). Only
# authentic commands get here, so only the key holder can fill it.
SEEN_LIMIT = 10_000

# Acks and status wait here while the broker is away. 1000 acks is minutes of
# a busy experiment; beyond that the oldest acks are dropped (and logged).
OUTBOX_LIMIT = 1000

# QoS 1 publishes the sender keeps in flight at once. Waiting for each
# PUBACK before the next publish costs a broker round trip per ack, and a
# command's acks come in twos (received, applied): under a 50-agent fan-out
# the broker is slowest exactly then. Below paho's own in-flight limit (20),
# beyond which it would queue them itself.
SEND_WINDOW = 16

# How long shutdown waits for the last acks and the offline status to reach
# the broker.
FLUSH_TIMEOUT_S = 5.0

# The watchdog wakes at least this often, so /healthz can tell a stuck event
# loop from an idle one.
WATCHDOG_TICK_S = 1.0

Phase = Literal["applying", "applied", "reverting", "stuck"]


class Clock(Protocol):
    """Monotonic time for deadlines, wall time for timestamps."""

    def monotonic(self) -> float: ...

    def now(self) -> datetime: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass(frozen=True)
class Arrival:
    """When a command reached the agent, on both clocks."""

    at: datetime
    monotonic: float


@dataclass(frozen=True)
class Rejection:
    """Why a command was refused. `kind` labels the metric, `reason` is the
    sentence in the ack."""

    kind: str
    reason: str


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 1


class Outbox:
    """Messages for the broker, in order, kept while it is unreachable.

    Retained messages (the status) replace any older one on the same topic:
    only the latest status means anything.
    """

    def __init__(self, limit: int = OUTBOX_LIMIT) -> None:
        self.limit = limit
        self._queue: deque[Outgoing] = deque()
        self._ready = asyncio.Event()
        self._in_flight = 0
        self._log = structlog.get_logger("chaos_agent.outbox")

    def put(self, message: Outgoing) -> None:
        if message.retain:
            stale = [m for m in self._queue if m.retain and m.topic == message.topic]
            for old in stale:
                self._queue.remove(old)
        self._queue.append(message)
        if len(self._queue) > self.limit:
            dropped = self._queue.popleft()
            self._log.warning("outbox_full_dropped", topic=dropped.topic)
        self._ready.set()

    def put_back(self, message: Outgoing) -> None:
        """Return a message whose publish failed to the head of the queue."""
        self._queue.appendleft(message)
        self._in_flight -= 1
        self._ready.set()

    async def get(self) -> Outgoing:
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        self._in_flight += 1
        return self._queue.popleft()

    def done(self) -> None:
        self._in_flight -= 1
        self._ready.set()

    async def flushed(self) -> None:
        """Return once everything put so far has been published."""
        while self._queue or self._in_flight:
            self._ready.clear()
            await self._ready.wait()

    def drain(self) -> list[Outgoing]:
        """Take every waiting message (tests read acks this way)."""
        messages = list(self._queue)
        self._queue.clear()
        return messages


@dataclass
class FaultState:
    """One fault from its inject command until it is reverted."""

    command: wire.Command
    fault: Any
    driver: FaultDriver[Any]
    arrival: Arrival
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    phase: Phase = "applying"
    record: Record = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    applied_at: datetime | None = None
    deadline: float = math.inf
    lease_deadline: float = math.inf
    revert_cause: wire.RevertCause | None = None
    # The revert or revert_all command that asked for the revert, if any.
    revert_by: tuple[uuid.UUID, Arrival] | None = None
    revert_task: asyncio.Task[bool] | None = None

    @property
    def fault_id(self) -> uuid.UUID:
        return self.command.id

    @property
    def fault_type(self) -> str:
        return str(self.fault.type)

    @property
    def experiment(self) -> str:
        return self.command.experiment


class Agent:
    """The safety rules and the fault lifecycle, independent of the broker."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        driver_factory: DriverFactory = load_driver,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.site = settings.site
        self.node = settings.node
        self.labels = dict(settings.labels)
        self.policy = settings.policy
        self.driver_factory = driver_factory
        self.clock: Clock = clock or SystemClock()
        self.metrics = metrics or Metrics()
        self.outbox = Outbox()
        self.journal = Journal(settings.state_dir / "journal")
        broker = settings.broker_address
        self.context = FaultContext(
            policy=settings.policy,
            state_dir=settings.state_dir,
            cgroup_root=settings.cgroup_root,
            broker_host=broker.host,
            broker_port=broker.port,
        )
        # Raises SettingsError when no key is given and unsigned operation
        # was not asked for, WireError naming the file a key cannot be read.
        settings.check_trust()
        self.trusted_keys = wire.load_trusted_keys(settings.trust)
        self.capabilities = wire.Capabilities()
        self.availability: dict[str, Availability] = {}
        self.started_at = self.clock.now()
        self.connected = False
        self.closing = False
        # Real time of the watchdog's last pass, for /healthz.
        self.last_tick = time.monotonic()
        # Journal entries whose revert failed at start: an operator must look.
        self.stuck_at_start: list[uuid.UUID] = []
        self._faults: dict[uuid.UUID, FaultState] = {}
        self._halts: dict[str, wire.Halt] = {}
        # Newest issued_at of an authentic halt or resume per halt topic: an
        # older signed one arriving later is a replay and is ignored.
        self._halt_issued: dict[str, datetime] = {}
        self._seen: OrderedDict[uuid.UUID, datetime] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._command_topics = {
            wire.command_topic(self.site, self.node),
            wire.command_topic(self.site),
            wire.command_topic(),
        }
        self.log = structlog.get_logger("chaos_agent.agent").bind(
            site=self.site, node=self.node
        )

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Revert what the journal holds, then probe what this node can do.

        Call before subscribing: a fault left by a killed agent is undone
        before any new command can arrive.
        """
        self.journal.open()
        await self.reconcile()
        if self.trusted_keys:
            self._recall_halts()
        else:
            self.log.warning(
                "insecure_unsigned_commands_accepted",
                hint="anyone who can publish on the broker can inject faults; "
                "for a laptop demo only: give the coordinator's public key with "
                "--trust",
            )

        # The real drivers are probed in a child process, so what the probes
        # import does not stay resident here (see probe_faults_isolated).
        report = await inspect_node(
            self.driver_factory,
            self.context,
            isolated=self.driver_factory is load_driver,
        )
        self.availability = report.faults
        self.capabilities = capabilities_of(report.cgroup.version, report.faults)
        self.log.info(
            "capabilities_probed",
            faults=self.capabilities.faults,
            missing=sorted(self.capabilities.missing),
            cgroup=self.capabilities.cgroup,
        )
        self.publish_status()

    def _recall_halts(self) -> None:
        """Take back the halts in force and the newest halt times a previous
        run saw: a restart must neither lift a halt nor let an older genuine
        resume do it (see chaos_agent.halt_memory)."""
        memory = halt_memory.load(self.settings.state_dir)
        # Only the topics this agent listens to: a halt of a site it no
        # longer belongs to could never be resumed here.
        topics = {wire.halt_topic(), wire.halt_topic(self.site)}
        self._halts.update((t, h) for t, h in memory.halts.items() if t in topics)
        self._halt_issued.update(
            (t, at) for t, at in memory.newest.items() if t in topics
        )
        self.metrics.halted.set(1 if self.halted else 0)
        if self.halted:
            self.log.warning("halted_since_last_run", reason=self.halt_reason)

    def _remember_halts(self) -> None:
        memory = halt_memory.HaltMemory(dict(self._halts), dict(self._halt_issued))
        try:
            halt_memory.save(self.settings.state_dir, memory)
        except OSError as exc:
            # The halt still holds in memory; only a restart would forget it.
            self.log.error(
                "halt_memory_unwritable",
                error=str(exc),
                hint="check the state directory's disk and permissions",
            )

    async def reconcile(self) -> int:
        """Revert every journal entry (cause `startup`); return how many."""
        entries = self.journal.entries()
        for entry in entries:
            log = self.log.bind(fault_id=str(entry.fault_id), fault=entry.fault_type)
            arrival = self._arrival()
            try:
                driver = self.driver_factory(entry.fault_type, self.context)
                detail = await self._revert_with_retries(driver, entry.record, log)
            except Exception as exc:  # the entry stays; the next start tries again
                log.error("startup_revert_failed", error=str(exc))
                self.stuck_at_start.append(entry.fault_id)
                self.metrics.faults_failed.labels(entry.fault_type, "revert").inc()
                self._ack(
                    "failed",
                    command_id=entry.fault_id,
                    experiment=entry.experiment,
                    arrival=arrival,
                    fault_id=entry.fault_id,
                    fault_type=entry.fault_type,
                    reason=f"revert at startup failed, fault left in journal: {exc}",
                )
                continue

            self.journal.remove(entry.fault_id)
            self.metrics.faults_reverted.labels(entry.fault_type, "startup").inc()
            log.warning("fault_reverted_at_startup", state=entry.state)
            self._ack(
                "reverted",
                command_id=entry.fault_id,
                experiment=entry.experiment,
                arrival=arrival,
                fault_id=entry.fault_id,
                fault_type=entry.fault_type,
                revert_cause="startup",
                detail=detail,
            )
        return len(entries)

    async def shutdown(self) -> None:
        """Refuse new commands and revert every fault (cause `shutdown`)."""
        self.closing = True
        tasks = self.revert_all("shutdown")
        if tasks:
            self.log.info("shutdown_reverting", faults=len(tasks))
            _, pending = await asyncio.wait(
                tasks, timeout=self.settings.shutdown_timeout_s
            )
            if pending:
                self.log.error(
                    "shutdown_revert_timeout",
                    pending=len(pending),
                    hint="the journal keeps them; the next start reverts them",
                )

        # Connections that the proxy latency engine still relays, undelayed,
        # after a revert keep its (redirect-free) nft table alive; cut them so
        # the table goes with us. Only if a proxy fault ever ran here.
        proxy_engine = sys.modules.get("chaos_agent.faults.proxy_engine")
        if proxy_engine is not None:
            await proxy_engine.shutdown()
        if not self._faults:
            from chaos_agent.cgroups import remove_root_if_unused

            remove_root_if_unused(self.context.cgroup_root)
        self.publish_status()

    async def idle(self) -> None:
        """Wait until no apply or revert task is running."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def watchdog(self) -> None:
        """Enforce deadlines forever; wakes early when deadlines change."""
        while True:
            self.last_tick = time.monotonic()
            self.enforce_deadlines()
            wait = min(WATCHDOG_TICK_S, self._next_deadline() - self.clock.monotonic())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.0))

    def enforce_deadlines(self) -> None:
        """Start reverting every applied fault past its duration or lease."""
        now = self.clock.monotonic()
        for state in list(self._faults.values()):
            if state.phase != "applied":
                continue
            if now >= state.deadline:
                self.request_revert(state, "duration")
            elif now >= state.lease_deadline:
                self.log.warning(
                    "lease_expired",
                    fault_id=str(state.fault_id),
                    experiment=state.experiment,
                )
                self.request_revert(state, "lease")

    def _next_deadline(self) -> float:
        deadlines = [
            min(s.deadline, s.lease_deadline)
            for s in self._faults.values()
            if s.phase == "applied"
        ]
        return min(deadlines, default=math.inf)

    # --------------------------------------------------------------- queries

    @property
    def halted(self) -> bool:
        return bool(self._halts)

    @property
    def halt_reason(self) -> str:
        return "; ".join(
            f"{topic}: {halt.reason or 'no reason given'}"
            for topic, halt in sorted(self._halts.items())
        )

    @property
    def faults(self) -> list[FaultState]:
        return list(self._faults.values())

    def status(self, *, online: bool = True) -> wire.Status:
        return wire.Status(
            node=self.node,
            site=self.site,
            online=online,
            version=__version__,
            labels=self.labels,
            capabilities=self.capabilities,
            faults=[self._active(s) for s in self._faults.values() if s.applied_at],
            halted=self.halted,
            halt_reason=self.halt_reason,
            started_at=self.started_at,
            at=self.clock.now(),
        )

    def health(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "site": self.site,
            "broker_connected": self.connected,
            "halted": self.halted,
            "halt_reason": self.halt_reason,
            "faults_active": len(self._faults),
            "faults_stuck": [
                str(s.fault_id) for s in self._faults.values() if s.phase == "stuck"
            ]
            + [str(fault_id) for fault_id in self.stuck_at_start],
            "closing": self.closing,
            "last_tick": self.last_tick,
        }

    def _active(self, state: FaultState) -> wire.ActiveFault:
        assert state.applied_at is not None
        now_wall, now = self.clock.now(), self.clock.monotonic()

        def wall(deadline: float) -> datetime:
            return now_wall + timedelta(seconds=max(deadline - now, 0.0))

        detail = dict(state.detail)
        if state.phase != "applied":
            detail["phase"] = state.phase
        return wire.ActiveFault(
            fault_id=state.fault_id,
            type=state.fault_type,
            experiment=state.experiment,
            applied_at=state.applied_at,
            expires_at=wall(state.deadline),
            lease_expires_at=wall(state.lease_deadline),
            detail=detail,
        )

    # -------------------------------------------------------------- messages

    def handle(self, topic: str, payload: bytes) -> None:
        """Take one MQTT message. Never blocks and never raises: slow work
        runs as tasks, and a bad message is answered or logged."""
        try:
            if topic in (wire.halt_topic(), wire.halt_topic(self.site)):
                self._on_halt(topic, payload)
            elif topic.startswith(wire.lease_topic("")):
                self._on_lease(topic, payload)
            elif topic in self._command_topics:
                self._on_command(topic, payload)
            else:
                # Some brokers (amqtt 0.12) send retained messages of topics
                # this agent never subscribed to, such as other agents' status.
                self.log.debug("unexpected_topic", topic=topic)
        except Exception:  # a bug here must not end the message loop
            self.log.exception("message_handling_failed", topic=topic)

    def on_connected(self) -> None:
        """A new session starts; the retained halts arrive right after the
        subscription, before any command.

        With signatures, a halt is kept across reconnects: only a signed
        resume lifts it (a missing retained message proves nothing, anyone
        with broker access can delete one). Unsigned, halts are forgotten
        until the broker resends them, since a halt cleared while the agent
        was away leaves no retained message to say so.
        """
        self.connected = True
        self.metrics.broker_connected.set(1)
        if not self.trusted_keys:
            self._halts.clear()
            self.metrics.halted.set(0)

    def on_disconnected(self) -> None:
        self.connected = False
        self.metrics.broker_connected.set(0)

    def _on_halt(self, topic: str, payload: bytes) -> None:
        """Halt on any halt message; resume only on an authentic one.

        A forged or unreadable halt only stops experiments, so it is
        honoured (halting is the safe side). Resuming lets faults through
        again, so with trusted keys it takes a resume (`halted: false`)
        signed by one of them and not older than the last authentic halt
        message on that topic; an empty retained message resumes only an
        agent without keys.
        """
        was_halted, old_reason = self.halted, self.halt_reason
        remembered = (dict(self._halts), dict(self._halt_issued))
        if not payload:
            if self.trusted_keys:
                if topic in self._halts:
                    self.log.warning(
                        "resume_refused",
                        topic=topic,
                        reason="an empty retained message is not a signed resume",
                    )
            else:
                self._halts.pop(topic, None)
        else:
            try:
                halt = wire.decode(wire.Halt, payload)
            except wire.WireError as exc:
                self.log.error("halt_unreadable", topic=topic, error=str(exc))
                halt = wire.Halt(halted=True, reason=f"unreadable halt message: {exc}")
            authentic = self._authentic_halt(topic, halt)
            if halt.halted:
                self._halts[topic] = halt
            elif authentic:
                self._halts.pop(topic, None)

        if self.trusted_keys and remembered != (self._halts, self._halt_issued):
            self._remember_halts()
        self.metrics.halted.set(1 if self.halted else 0)
        if self.halted:
            if not was_halted:
                self.log.warning("halted", reason=self.halt_reason)
            self.revert_all("halt")
        elif was_halted:
            self.log.info("resumed")
        if (was_halted, old_reason) != (self.halted, self.halt_reason):
            self.publish_status()

    def _authentic_halt(self, topic: str, halt: wire.Halt) -> bool:
        """Whether `halt` may lift a halt: signed by a trusted key (when keys
        are set) and not older than the last authentic one on `topic`."""
        if not self.trusted_keys:
            return True
        rejection = self.authenticate(halt)
        if rejection is not None:
            event = "halt_unsigned_honoured" if halt.halted else "resume_refused"
            self.log.warning(event, topic=topic, reason=rejection.reason)
            return False
        newest = self._halt_issued.get(topic)
        if newest is not None and halt.issued_at < newest:
            self.log.warning(
                "halt_replay_ignored" if not halt.halted else "halt_stale",
                topic=topic,
                issued_at=halt.issued_at.isoformat(),
                newest=newest.isoformat(),
            )
            return False
        self._halt_issued[topic] = halt.issued_at
        return True

    def _on_lease(self, topic: str, payload: bytes) -> None:
        experiment = topic.rsplit("/", 1)[-1]
        try:
            renewal = wire.decode(wire.LeaseRenewal, payload)
        except wire.WireError as exc:
            self.log.warning("lease_renewal_invalid", topic=topic, error=str(exc))
            return
        rejection = self.authenticate(renewal)
        if rejection is not None:
            self.log.warning(
                "lease_renewal_refused", topic=topic, reason=rejection.reason
            )
            return
        if renewal.experiment != experiment:
            self.log.warning(
                "lease_renewal_mismatch", topic=topic, experiment=renewal.experiment
            )
            return
        lease_s = min(renewal.lease_s, self.policy.max_lease_s)
        # A recorded renewal replayed later must not keep a fault alive: one
        # older than its own lease is stale. The clock skew allowance counts
        # on both sides, so a coordinator whose clock is behind still works.
        now = self.clock.now()
        age_s = (now - renewal.issued_at).total_seconds()
        skew_s = self.settings.max_clock_skew_s
        if age_s > lease_s + skew_s or -age_s > skew_s:
            self.log.warning(
                "lease_renewal_stale",
                topic=topic,
                issued_at=renewal.issued_at.isoformat(),
                agent_clock=now.isoformat(),
            )
            return

        deadline = self.clock.monotonic() + lease_s
        renewed = 0
        for state in self._faults.values():
            if state.experiment == experiment and state.phase == "applied":
                state.lease_deadline = deadline
                renewed += 1
        self._wake.set()
        if renewed:
            # The retained status carries each fault's lease_expires_at:
            # `aftershock status` must not show a lease about to run out.
            self.publish_status()

    def _on_command(self, topic: str, payload: bytes) -> None:
        arrival = self._arrival()
        own_topic = topic == wire.command_topic(self.site, self.node)
        try:
            command = wire.decode(wire.Command, payload)
        except wire.WireError as exc:
            self.log.warning("command_malformed", topic=topic, error=str(exc))
            self.metrics.commands_rejected.labels("malformed").inc()
            self._ack(
                "rejected",
                command_id=_command_id_of(payload),
                experiment=None,
                arrival=arrival,
                reason=str(exc),
            )
            return

        if not command.target.matches(self.site, self.node, self.labels):
            if own_topic:
                self._reject(command, arrival, Rejection("target", _mismatch(command)))
            return
        # Before the duplicate check: a forged copy must not be able to make
        # the genuine command look like a duplicate.
        rejection = self.authenticate(command)
        if rejection is not None:
            self._reject(command, arrival, rejection)
            return
        remembered = self._remember(command, arrival.at)
        if remembered == "duplicate":
            self.log.info("command_duplicate_ignored", command_id=str(command.id))
            return
        if remembered == "full":
            reason = (
                f"replay cache is full ({SEEN_LIMIT} unexpired command ids); new "
                "commands are refused until ids expire (at most "
                f"{wire.MAX_COMMAND_VALIDITY_S:g}s); send fewer, shorter-lived "
                "commands"
            )
            self.log.error("replay_cache_full", limit=SEEN_LIMIT)
            self._reject(command, arrival, Rejection("replay_cache_full", reason))
            return

        self.metrics.commands_received.labels(command.action).inc()
        self._ack("received", command_id=command.id, arrival=arrival, command=command)
        rejection = self.admit(command, arrival)
        if rejection is not None:
            self._reject(command, arrival, rejection)
            return

        if command.action == "inject":
            self._inject(command, arrival)
        elif command.action == "revert":
            self._revert_command(command, arrival)
        elif command.action == "revert_all":
            self._revert_all_command(command, arrival)
        else:
            self._ack(
                "applied",
                command_id=command.id,
                arrival=arrival,
                command=command,
                detail={
                    "pong": True,
                    "faults_active": len(self._faults),
                    "halted": self.halted,
                },
            )

    def authenticate(
        self, message: wire.Command | wire.LeaseRenewal | wire.Halt
    ) -> Rejection | None:
        """Whether `message` is signed by a trusted key; None also when the
        agent runs with --insecure-allow-unsigned (no keys)."""
        if not self.trusted_keys:
            return None
        try:
            wire.verify(message, self.trusted_keys)
        except wire.SignatureError as exc:
            return Rejection("signature", str(exc))
        return None

    def admit(self, command: wire.Command, arrival: Arrival) -> Rejection | None:
        """Whether this agent accepts an authentic `command` at all, whatever
        its action: it must be current, and valid for a short window only."""
        if command.expires_at <= arrival.at:
            reason = (
                f"command expired at {command.expires_at.isoformat()} (agent clock "
                f"{arrival.at.isoformat()}); send it again, or check the clocks"
            )
            return Rejection("expired", reason)
        skew = timedelta(seconds=self.settings.max_clock_skew_s)
        if command.issued_at > arrival.at + skew:
            reason = (
                f"command issued at {command.issued_at.isoformat()}, in the future "
                f"by this agent's clock ({arrival.at.isoformat()}); synchronize the "
                "clocks (NTP)"
            )
            return Rejection("clock", reason)
        validity = (command.expires_at - command.issued_at).total_seconds()
        if validity > wire.MAX_COMMAND_VALIDITY_S:
            reason = (
                f"command is valid for {validity:g}s, longer than the "
                f"{wire.MAX_COMMAND_VALIDITY_S:g}s an agent accepts"
            )
            return Rejection("validity", reason)
        return None

    def _remember(
        self, command: wire.Command, now: datetime
    ) -> Literal["new", "duplicate", "full"]:
        """Record the command id until it expires.

        Ids are kept in arrival order and dropped from the front once
        expired. An admissible command expires at most the validity window
        plus the clock skew after arrival, so the kept expiry is capped there:
        a command claiming a far expiry (refused by `admit` anyway) cannot
        pin the front of the queue.
        """
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if command.id in self._seen:
            return "duplicate"
        if len(self._seen) >= SEEN_LIMIT:
            return "full"
        horizon = now + timedelta(
            seconds=wire.MAX_COMMAND_VALIDITY_S + self.settings.max_clock_skew_s
        )
        self._seen[command.id] = min(command.expires_at, horizon)
        return "new"

    # ------------------------------------------------------------ inject

    def _inject(self, command: wire.Command, arrival: Arrival) -> None:
        fault = command.fault
        assert fault is not None and command.duration_s and command.lease_s
        try:
            driver = self._admit_fault(command, fault)
        except _Refused as refused:
            self._reject(command, arrival, refused.rejection)
            return

        state = FaultState(command=command, fault=fault, driver=driver, arrival=arrival)
        self._faults[state.fault_id] = state
        self._spawn(self._apply(state), name=f"apply:{state.fault_id}")

    def _admit_fault(self, command: wire.Command, fault: Any) -> FaultDriver[Any]:
        """Every check that comes before a change; raises _Refused."""
        assert command.duration_s is not None and command.lease_s is not None
        if self.halted:
            reason = (
                f"agent is halted ({self.halt_reason}); no fault is applied until "
                "`aftershock resume`"
            )
            raise _Refused("halted", reason)
        if self.closing:
            raise _Refused("shutting_down", "agent is shutting down")
        if command.id in self._faults:
            raise _Refused("duplicate", f"fault {command.id} is already active here")
        try:
            self.policy.check_fault_type(fault.type)
            self.policy.check_duration(command.duration_s, command.lease_s)
        except PolicyViolation as exc:
            raise _Refused("policy", str(exc)) from None

        availability = self.availability.get(fault.type)
        if availability is not None and not availability.ok:
            reason = f"fault type {fault.type!r} is not available on this node: "
            raise _Refused("unavailable", reason + availability.reason)
        try:
            driver = self.driver_factory(fault.type, self.context)
        except (UnknownFaultType, ImportError) as exc:
            raise _Refused("unavailable", str(exc)) from None
        try:
            driver.check(fault)
        except PolicyViolation as exc:
            raise _Refused("policy", str(exc)) from None
        except FaultRejected as exc:
            raise _Refused("fault", str(exc)) from None
        return driver

    async def _apply(self, state: FaultState) -> None:
        log = self.log.bind(
            fault_id=str(state.fault_id),
            fault=state.fault_type,
            experiment=state.experiment,
        )
        async with state.lock:
            try:
                await self._prepare_and_apply(state, log)
            except Exception as exc:
                await self._apply_failed(state, exc, log)
                return

            now = self.clock.monotonic()
            assert state.command.duration_s and state.command.lease_s
            state.phase = "applied"
            state.applied_at = self.clock.now()
            state.deadline = now + state.command.duration_s
            state.lease_deadline = now + state.command.lease_s
            self.metrics.faults_applied.labels(state.fault_type).inc()
            self._count_active()
            log.info(
                "fault_applied", duration_s=state.command.duration_s, **state.detail
            )
            self._ack(
                "applied",
                command_id=state.fault_id,
                arrival=state.arrival,
                command=state.command,
                detail=state.detail,
            )
            self.publish_status()
            self._wake.set()

    async def _prepare_and_apply(
        self, state: FaultState, log: structlog.stdlib.BoundLogger
    ) -> None:
        state.record = await state.driver.prepare(str(state.fault_id), state.fault)
        # fsync takes milliseconds, longer on a busy disk: off the event loop,
        # so that the message loop and the deadlines never wait for it.
        await asyncio.to_thread(self.journal.write, self._entry(state, "prepared"))

        # A driver that hangs must not hold the fault's lock forever; the
        # duration and the lease count from the end of apply.
        state.detail = await asyncio.wait_for(
            state.driver.apply(str(state.fault_id), state.fault, state.record),
            timeout=APPLY_TIMEOUT_S,
        )
        await asyncio.to_thread(self.journal.write, self._entry(state, "applied"))

    async def _apply_failed(
        self, state: FaultState, error: Exception, log: structlog.stdlib.BoundLogger
    ) -> None:
        if isinstance(error, TimeoutError):
            reason = f"apply did not finish within {APPLY_TIMEOUT_S:g}s"
        elif isinstance(error, JournalError | FaultFailed):
            reason = str(error)
        else:
            reason = f"apply raised {error!r}"
        log.error("fault_apply_failed", error=reason)
        self.metrics.faults_failed.labels(state.fault_type, "apply").inc()

        # Undo whatever part of the fault the record covers; revert is
        # idempotent, so a fault that never started is reverted trivially.
        reverted = True
        if state.record:
            try:
                await self._revert_with_retries(state.driver, state.record, log)
            except Exception as exc:  # reported in the ack and the journal stays
                reverted = False
                reason += f"; revert after the failure also failed: {exc}"
        if reverted:
            await asyncio.to_thread(self.journal.remove, state.fault_id)
            del self._faults[state.fault_id]
        else:
            state.phase = "stuck"
        self._count_active()
        self._ack(
            "failed",
            command_id=state.fault_id,
            arrival=state.arrival,
            command=state.command,
            reason=reason,
        )
        self.publish_status()

    # ------------------------------------------------------------ revert

    def _revert_command(self, command: wire.Command, arrival: Arrival) -> None:
        assert command.fault_id is not None
        state = self._faults.get(command.fault_id)
        if state is None:
            reason = (
                f"no active fault {command.fault_id} on this agent "
                "(already reverted, or never applied here)"
            )
            self._reject(command, arrival, Rejection("unknown_fault", reason))
            return
        self.request_revert(state, "command", by=(command.id, arrival))

    def _revert_all_command(self, command: wire.Command, arrival: Arrival) -> None:
        fault_ids = [str(state.fault_id) for state in self._faults.values()]
        tasks = self.revert_all("command", by=(command.id, arrival))

        async def summarize() -> None:
            results = await asyncio.gather(*tasks)
            self._ack(
                "reverted" if all(results) else "failed",
                command_id=command.id,
                arrival=arrival,
                command=command,
                revert_cause="command",
                detail={"faults": fault_ids},
                reason=None if all(results) else "some faults could not be reverted",
            )

        self._spawn(summarize(), name=f"revert_all:{command.id}")

    def revert_all(
        self,
        cause: wire.RevertCause,
        by: tuple[uuid.UUID, Arrival] | None = None,
    ) -> list[asyncio.Task[bool]]:
        """Start reverting every fault; return the tasks (each -> reverted?)."""
        return [self.request_revert(s, cause, by) for s in list(self._faults.values())]

    def request_revert(
        self,
        state: FaultState,
        cause: wire.RevertCause,
        by: tuple[uuid.UUID, Arrival] | None = None,
    ) -> asyncio.Task[bool]:
        """Start reverting `state` unless a revert is already under way.

        A revert asked for while the fault is still being applied waits for
        the apply to finish (the per-fault lock), then undoes it.
        """
        if state.revert_task is not None and not state.revert_task.done():
            return state.revert_task
        state.revert_cause, state.revert_by = cause, by
        task = self._spawn(self._revert(state), name=f"revert:{state.fault_id}")
        state.revert_task = task
        return task

    async def _revert(self, state: FaultState) -> bool:
        log = self.log.bind(
            fault_id=str(state.fault_id),
            fault=state.fault_type,
            experiment=state.experiment,
            cause=state.revert_cause,
        )
        async with state.lock:
            if self._faults.get(state.fault_id) is not state:
                return True  # its apply failed and already cleaned up
            state.phase = "reverting"
            command_id, arrival = state.revert_by or (state.fault_id, state.arrival)
            started = time.monotonic()
            try:
                detail = await self._revert_with_retries(
                    state.driver, state.record, log
                )
            except Exception as exc:
                state.phase = "stuck"
                self.metrics.faults_failed.labels(state.fault_type, "revert").inc()
                log.error(
                    "fault_revert_failed",
                    error=str(exc),
                    hint="the journal keeps the fault; fix the cause and restart",
                )
                self._ack(
                    "failed",
                    command_id=command_id,
                    arrival=arrival,
                    experiment=state.experiment,
                    fault_id=state.fault_id,
                    fault_type=state.fault_type,
                    reason=f"revert failed after {REVERT_ATTEMPTS} attempts: {exc}",
                )
                self.publish_status()
                return False

            self.metrics.revert_seconds.labels(state.fault_type).observe(
                time.monotonic() - started
            )
            await asyncio.to_thread(self.journal.remove, state.fault_id)
            del self._faults[state.fault_id]
            assert state.revert_cause is not None
            self.metrics.faults_reverted.labels(
                state.fault_type, state.revert_cause
            ).inc()
            self._count_active()
            log.info("fault_reverted")
            self._ack(
                "reverted",
                command_id=command_id,
                arrival=arrival,
                experiment=state.experiment,
                fault_id=state.fault_id,
                fault_type=state.fault_type,
                revert_cause=state.revert_cause,
                detail=detail,
            )
            self.publish_status()
            return True

    async def _revert_with_retries(
        self,
        driver: FaultDriver[Any],
        record: Record,
        log: structlog.stdlib.BoundLogger,
    ) -> dict[str, Any]:
        for attempt in range(1, REVERT_ATTEMPTS + 1):
            try:
                return await asyncio.wait_for(driver.revert(record), REVERT_TIMEOUT_S)
            except Exception as exc:
                if attempt == REVERT_ATTEMPTS:
                    raise
                log.warning("fault_revert_retry", attempt=attempt, error=repr(exc))
                await asyncio.sleep(REVERT_RETRY_S * attempt)
        raise AssertionError("unreachable")  # the loop returns or raises

    # ------------------------------------------------------------ helpers

    def publish_status(self) -> None:
        status = self.status(online=True)
        self.outbox.put(
            Outgoing(
                wire.status_topic(self.site, self.node),
                wire.encode(status),
                retain=True,
            )
        )

    def offline_status(self) -> bytes:
        return wire.encode(self.status(online=False))

    def _reject(
        self, command: wire.Command, arrival: Arrival, rejection: Rejection
    ) -> None:
        self.metrics.commands_rejected.labels(rejection.kind).inc()
        self.log.info(
            "command_rejected",
            command_id=str(command.id),
            action=command.action,
            kind=rejection.kind,
            reason=rejection.reason,
        )
        self._ack(
            "rejected",
            command_id=command.id,
            arrival=arrival,
            command=command,
            reason=rejection.reason,
        )

    def _ack(
        self,
        state: wire.AckState,
        *,
        command_id: uuid.UUID | None,
        arrival: Arrival,
        command: wire.Command | None = None,
        experiment: str | None = None,
        fault_id: uuid.UUID | None = None,
        fault_type: str | None = None,
        reason: str | None = None,
        revert_cause: wire.RevertCause | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        if command is not None:
            experiment = experiment or command.experiment
            if command.action == "inject" and command.fault is not None:
                fault_id = fault_id or command.id
                fault_type = fault_type or command.fault.type
            elif command.action == "revert":
                fault_id = fault_id or command.fault_id
        elapsed_ms = (self.clock.monotonic() - arrival.monotonic) * 1000
        ack = wire.Ack(
            command_id=command_id,
            node=self.node,
            site=self.site,
            experiment=experiment,
            state=state,
            fault_id=fault_id,
            fault_type=fault_type,
            reason=reason[:2048] if reason else None,
            revert_cause=revert_cause,
            detail=_jsonable(detail or {}),
            timings=wire.Timings(
                received_at=arrival.at,
                at=self.clock.now(),
                elapsed_ms=max(elapsed_ms, 0),
            ),
        )
        self.outbox.put(
            Outgoing(wire.ack_topic(self.site, self.node), wire.encode(ack))
        )

    def _entry(
        self, state: FaultState, phase: Literal["prepared", "applied"]
    ) -> JournalEntry:
        return JournalEntry(
            fault_id=state.fault_id,
            fault_type=state.fault_type,
            experiment=state.experiment,
            state=phase,
            record=state.record,
            written_at=self.clock.now(),
            fault=state.fault.model_dump(mode="json"),
        )

    def _arrival(self) -> Arrival:
        return Arrival(self.clock.now(), self.clock.monotonic())

    def _count_active(self) -> None:
        counts: dict[str, int] = dict.fromkeys(wire.FAULT_TYPES, 0)
        for state in self._faults.values():
            counts[state.fault_type] = counts.get(state.fault_type, 0) + 1
        for fault_type, count in counts.items():
            self.metrics.faults_active.labels(fault_type).set(count)

    def _spawn(
        self, coroutine: Coroutine[Any, Any, Any], *, name: str
    ) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine, name=f"{self.node}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error(
                "task_failed", task=task.get_name(), error=repr(task.exception())
            )


class _Refused(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.rejection = Rejection(kind, reason)


def _mismatch(command: wire.Command) -> str:
    target = command.target.model_dump(mode="json", exclude_defaults=True)
    return f"this agent does not match the command's target {json.dumps(target)}"


def _command_id_of(payload: bytes) -> uuid.UUID | None:
    """The id of an invalid command, when it can be read, so that the rejected
    ack can still be matched to what was sent."""
    if len(payload) > wire.MAX_PAYLOAD_BYTES:
        return None
    try:
        return uuid.UUID(str(json.loads(payload)["id"]))
    # RecursionError: deeply nested arrays, which the fuzz test sends.
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        return None


def _jsonable(detail: dict[str, Any]) -> dict[str, Any]:
    # Drivers report facts as they like; the ack must still encode.
    loaded: dict[str, Any] = json.loads(json.dumps(detail, default=str))
    return loaded


# ------------------------------------------------------------------ session


class Session:
    """The agent's MQTT connection: subscribe, receive, publish, reconnect."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.settings = agent.settings
        self._closing = asyncio.Event()
        self._closed = asyncio.Event()
        self._runner: asyncio.Task[Any] | None = None
        self.log = agent.log.bind(component="mqtt")
        # Built once, so unreadable TLS files stop the agent at start instead
        # of failing every reconnect.
        self._tls = self._tls_context() if self.settings.broker_address.tls else None

    async def run(self) -> None:
        """Stay connected until `close()`; reconnect with capped, jittered
        exponential backoff."""
        self._runner = asyncio.current_task()
        attempt = 0
        try:
            while not self._closing.is_set():
                try:
                    await self._connect_once()
                    attempt = 0
                except aiomqtt.MqttError as exc:
                    self.agent.on_disconnected()
                    base = self.settings.reconnect_min_s * 2**attempt
                    cap = self.settings.reconnect_max_s
                    delay = min(cap, base) * random.uniform(0.5, 1)
                    attempt += 1
                    self.log.warning(
                        "broker_unreachable",
                        error=str(exc),
                        retry_in_s=delay,
                        **self._hint(),
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closing.wait(), delay)
        finally:
            self._closed.set()

    async def close(self) -> None:
        """Flush acks, publish the offline status, disconnect.

        Without a connection there is nothing to flush: a connection attempt
        under way is abandoned rather than waited for.
        """
        self._closing.set()
        if not self.agent.connected and self._runner is not None:
            self._runner.cancel()
        await self._closed.wait()

    def _client(self) -> aiomqtt.Client:
        broker = self.settings.broker_address
        password = self.settings.password
        return aiomqtt.Client(
            broker.host,
            broker.port,
            username=self.settings.username,
            password=password.get_secret_value() if password else None,
            tls_context=self._tls,
            identifier=f"chaos-agent-{self.agent.site}-{self.agent.node}",
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=True,
            keepalive=self.settings.keepalive_s,
            # MQTT fixes the will at connect time, so the offline status it
            # carries lists the faults active then (usually none), not those
            # active when the agent died. The journal reverts those at the
            # next start; stressors also end on their own deadline.
            will=aiomqtt.Will(
                wire.status_topic(self.agent.site, self.agent.node),
                self.agent.offline_status(),
                qos=1,
                retain=True,
            ),
            # Nagle's algorithm meets delayed ACKs on every QoS 1 round trip
            # otherwise: ~45 ms per ack instead of ~1.5 ms (TESTING.md).
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )

    def _hint(self) -> dict[str, str]:
        """What to check when the broker refuses: a broker that requires
        client certificates often just drops the connection without one."""
        settings = self.settings
        if settings.broker_address.tls and settings.cert is None:
            return {
                "hint": "no client certificate given; if the broker requires "
                "one (mutual TLS), pass --cert and --key"
            }
        if not settings.broker_address.tls:
            return {"hint": "plain MQTT; if the broker speaks TLS use mqtts://"}
        return {"hint": "check the broker's log for the refusal reason"}

    def _tls_context(self) -> ssl.SSLContext:
        """Verify the broker against `ca` (or the system store) and show the
        client certificate when one is given (mutual TLS)."""
        settings = self.settings
        try:
            context = ssl.create_default_context(
                cafile=str(settings.ca) if settings.ca else None
            )
            if settings.cert is not None:
                context.load_cert_chain(
                    str(settings.cert), str(settings.key) if settings.key else None
                )
        except (OSError, ssl.SSLError) as exc:
            msg = f"cannot load the TLS files (--ca, --cert, --key): {exc}"
            raise SettingsError(msg) from None
        return context

    async def _connect_once(self) -> None:
        agent = self.agent
        async with self._client() as client:
            agent.on_connected()
            self.log.info("broker_connected", broker=self.settings.broker)

            # Halts first, in their own SUBSCRIBE: their retained messages
            # come before any command can.
            topics = wire.agent_subscriptions(agent.site, agent.node)
            halts = [t for t in topics if t.endswith("/halt")]
            await client.subscribe([(topic, 1) for topic in halts])
            await client.subscribe([(t, 1) for t in topics if t not in halts])
            agent.publish_status()

            try:
                async with asyncio.TaskGroup() as group:
                    name = f"{agent.node}"
                    tasks = [
                        group.create_task(
                            self._receive(client), name=f"{name}:receive"
                        ),
                        group.create_task(self._send(client), name=f"{name}:send"),
                        group.create_task(
                            self._report(client), name=f"{name}:telemetry"
                        ),
                    ]
                    await self._closing.wait()
                    await self._finish(client, tasks)
            except BaseExceptionGroup as group_error:
                # A lost connection surfaces as an MqttError from one of the
                # loops; hand it to the reconnect logic, let anything else out.
                lost, rest = group_error.split(aiomqtt.MqttError)
                if lost is not None and rest is None:
                    raise lost.exceptions[0] from None
                raise

    async def _finish(
        self, client: aiomqtt.Client, tasks: list[asyncio.Task[None]]
    ) -> None:
        tasks[0].cancel()  # no more commands
        try:
            await asyncio.wait_for(self.agent.outbox.flushed(), FLUSH_TIMEOUT_S)
        except TimeoutError:
            self.log.warning("shutdown_acks_unsent")
        for task in tasks[1:]:
            task.cancel()
        await client.publish(
            wire.status_topic(self.agent.site, self.agent.node),
            self.agent.offline_status(),
            qos=1,
            retain=True,
            timeout=FLUSH_TIMEOUT_S,
        )
        self.log.info("broker_disconnecting")

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            raw = payload if isinstance(payload, bytes | bytearray) else b""
            if isinstance(payload, str):
                raw = payload.encode()
            self.agent.handle(str(message.topic), bytes(raw))

    async def _send(self, client: aiomqtt.Client) -> None:
        """Publish the outbox in order, up to SEND_WINDOW unconfirmed at once.

        paho writes each message to the socket when its publish starts, and
        the tasks start in the order they were made, so the broker sees the
        outbox's order. When the connection fails, every unconfirmed message
        goes back to the head of the outbox in that order, to be sent again
        on the next connection (QoS 1 is at least once either way).
        """
        outbox = self.agent.outbox
        window = asyncio.Semaphore(SEND_WINDOW)
        unconfirmed: dict[int, Outgoing] = {}

        async def publish(sequence: int, message: Outgoing) -> None:
            try:
                await client.publish(
                    message.topic,
                    message.payload,
                    qos=message.qos,
                    retain=message.retain,
                )
            finally:
                window.release()
            del unconfirmed[sequence]
            outbox.done()

        try:
            async with asyncio.TaskGroup() as group:
                for sequence in itertools.count():
                    await window.acquire()
                    message = await outbox.get()
                    unconfirmed[sequence] = message
                    group.create_task(publish(sequence, message))
        except BaseExceptionGroup as failed:
            # The session's TaskGroup hands a bare MqttError to the reconnect
            # logic; a group nested in a group would escape it. The publish
            # tasks start no groups of their own, so the errors are leaves.
            lost, _ = failed.split(aiomqtt.MqttError)
            if lost is not None:
                raise lost.exceptions[0] from None
            raise
        finally:
            for message in reversed(unconfirmed.values()):
                outbox.put_back(message)

    async def _report(self, client: aiomqtt.Client) -> None:
        agent = self.agent
        topic = wire.telemetry_topic(agent.site, agent.node)
        while True:
            await asyncio.sleep(self.settings.telemetry_interval_s)
            telemetry = sample(agent.site, agent.node, len(agent.faults))
            record_sample(agent.metrics, telemetry)
            await client.publish(topic, wire.encode(telemetry), qos=0)


# ------------------------------------------------------------------- wiring


async def run_agent(
    settings: AgentSettings,
    *,
    driver_factory: DriverFactory = load_driver,
    on_ready: Callable[[Agent], None] | None = None,
) -> None:
    """Run the agent until SIGTERM or SIGINT, then revert everything and exit."""
    agent = Agent(settings, driver_factory=driver_factory)
    session = Session(agent)
    await agent.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, agent, stop, signum)

    # After agent.start(): a port already taken stops the agent, but only
    # once the journal's leftovers from a previous run are reverted.
    server = None
    if settings.metrics_listen:
        host, port = parse_listen(settings.metrics_listen)
        server = MetricsServer(agent.metrics, agent.health, host, port)
        try:
            await server.start()
        except OSError as exc:
            msg = (
                f"cannot serve /metrics on {settings.metrics_listen}: "
                f"{exc.strerror or exc}; choose another --metrics-listen HOST:PORT, "
                "or '' to serve none"
            )
            raise SettingsError(msg) from None
        agent.log.info("metrics_listening", listen=settings.metrics_listen)

    # Prime psutil's CPU counter so the first sample covers one interval.
    sample(agent.site, agent.node, 0)
    _release_startup_memory()
    if on_ready is not None:
        on_ready(agent)
    try:
        async with asyncio.TaskGroup() as group:
            watchdog = group.create_task(
                agent.watchdog(), name=f"{agent.node}:watchdog"
            )
            group.create_task(session.run(), name=f"{agent.node}:session")
            await stop.wait()

            await agent.shutdown()
            await session.close()
            watchdog.cancel()
    finally:
        if server is not None:
            await server.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    agent.log.info("agent_stopped")


def _release_startup_memory() -> None:
    """Hand the heap that start-up garbage left behind back to the kernel.

    Importing and building the wire models leaves ~2 MB of freed but still
    mapped heap; glibc keeps it unless asked. Elsewhere this does nothing.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _on_signal(agent: Agent, stop: asyncio.Event, signum: int) -> None:
    if stop.is_set():
        agent.log.warning("signal_ignored_while_reverting", signal=signum)
        return
    agent.log.info("shutdown_requested", signal=signal.Signals(signum).name)
    stop.set()
