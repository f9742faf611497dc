"""Real `chaos-agent run` subprocesses for integration tests.

    async with started_agent(broker.url, tmp_path, node="edge-1") as agent:
        acks = await agent.send(command)
        assert acks[-1].state == "applied"

`AgentProcess` starts the agent as `python -m chaos_agent.cli run --trust`
with a key pair made once per test session (`session_key()`), so `command()`
signs what it builds and `signed()` signs anything else (a lease renewal, a
resume); `insecure=True` starts it with `--insecure-allow-unsigned` instead,
for tests that drive it through a coordinator that does not sign yet. It waits
until its retained status says it is online, and ends it by its pid only
(`terminate()` = SIGTERM, `kill()` = SIGKILL). `AckCollector` listens to an
agent's acks so a test can wait for a state that comes later (a revert when
the duration ends, say).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit
from urllib.request import urlopen

import aiomqtt

from chaos_agent import wire
from chaos_agent.faults import load_driver
from chaos_agent.faults.base import FaultContext
from chaos_agent.journal import Journal
from chaos_agent.policy import Policy
from tests.brokers import free_port

TERMINAL = frozenset({"rejected", "applied", "reverted", "failed"})

SignedMessage = TypeVar("SignedMessage", wire.Command, wire.LeaseRenewal, wire.Halt)


@dataclass(frozen=True)
class SessionKey:
    private: wire.PrivateKey
    public_path: Path
    # The PEM private key, for a coordinator CLI under test (--signing-key).
    private_path: Path


@functools.cache
def session_key() -> SessionKey:
    """The coordinator key pair of this test session (one per process)."""
    directory = Path(tempfile.mkdtemp(prefix="aftershock-test-keys-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    private_path, public_path = wire.generate_key_pair(directory)
    return SessionKey(wire.load_private_key(private_path), public_path, private_path)


def signed(message: SignedMessage) -> SignedMessage:
    """`message` signed with the session key the test agents trust."""
    return wire.sign(message, session_key().private)


def _address(broker_url: str) -> tuple[str, int]:
    parts = urlsplit(broker_url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


def mqtt_client(
    broker_url: str, tls: aiomqtt.TLSParameters | None = None
) -> aiomqtt.Client:
    """A test-side MQTT 3.1.1 client with TCP_NODELAY, like the agent's; `tls`
    for an mqtts:// broker (the test CA and a client certificate)."""
    host, port = _address(broker_url)
    return aiomqtt.Client(
        host,
        port,
        tls_params=tls,
        identifier=f"test-{uuid.uuid4().hex[:12]}",
        protocol=aiomqtt.ProtocolVersion.V311,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )


def command(
    action: str = "inject",
    *,
    fault: Any = None,
    duration_s: float | None = None,
    lease_s: float | None = None,
    experiment: str = "it",
    valid_s: float = 60.0,
    sign: bool = True,
    **fields: Any,
) -> wire.Command:
    """A command issued now, signed with the session key unless `sign` is
    False; inject defaults to a 1% CPU fault for 30 s."""
    if action == "inject":
        fault = fault or wire.CpuFault(load_percent=1, workers=1)
        duration_s = duration_s or 30.0
        lease_s = lease_s or 30.0
    now = datetime.now(UTC)
    message = wire.Command(
        issued_at=now,
        expires_at=now + timedelta(seconds=valid_s),
        experiment=experiment,
        action=action,
        fault=fault,
        duration_s=duration_s,
        lease_s=lease_s,
        **fields,
    )
    return signed(message) if sign else message


class AckCollector:
    """Every ack one agent publishes while the collector is open."""

    def __init__(
        self,
        broker_url: str,
        site: str,
        node: str,
        tls: aiomqtt.TLSParameters | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.topic = wire.ack_topic(site, node)
        self.acks: list[wire.Ack] = []
        self._changed = asyncio.Event()
        self._client = mqtt_client(broker_url, tls)
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AckCollector:
        await self._client.__aenter__()
        await self._client.subscribe(self.topic, qos=1)
        self._reader = asyncio.create_task(self._read(), name="ack-collector")
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(kind, error, traceback)

    async def _read(self) -> None:
        async for message in self._client.messages:
            # amqtt 0.12 sends a new client the retained messages of every
            # topic any client subscribed to, so other topics do arrive here.
            if str(message.topic) != self.topic:
                continue
            if isinstance(message.payload, bytes | bytearray):
                self.acks.append(wire.decode(wire.Ack, message.payload))
                self._changed.set()

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        await self._client.publish(topic, payload, qos=1, retain=retain)

    def of(self, command_id: uuid.UUID) -> list[wire.Ack]:
        return [a for a in self.acks if a.command_id == command_id]

    async def wait_for(
        self, done: Callable[[list[wire.Ack]], bool], within_s: float = 15.0
    ) -> list[wire.Ack]:
        """Wait until `done(acks)`; raise TimeoutError listing what came."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while not done(self.acks):
                    self._changed.clear()
                    await self._changed.wait()
        if not done(self.acks):
            seen = [(str(a.command_id)[:8], a.state, a.reason) for a in self.acks]
            msg = f"acks never satisfied the condition; got {seen}"
            raise TimeoutError(msg)
        return self.acks

    async def wait_state(
        self, command_id: uuid.UUID, state: str, within_s: float = 15.0
    ) -> wire.Ack:
        await self.wait_for(
            lambda acks: any(
                a.command_id == command_id and a.state == state for a in acks
            ),
            within_s,
        )
        return next(a for a in self.of(command_id) if a.state == state)


async def retained_status(
    broker_url: str, site: str, node: str, within_s: float = 5.0
) -> wire.Status | None:
    """The status the broker retains for `node`, or None if there is none."""
    async with mqtt_client(broker_url) as client:
        await client.subscribe(wire.status_topic(site, node), qos=1)
        try:
            async with asyncio.timeout(within_s):
                async for message in client.messages:
                    if isinstance(message.payload, bytes | bytearray):
                        return wire.decode(wire.Status, message.payload)
        except TimeoutError:
            return None
    return None


async def wait_status(
    broker_url: str,
    site: str,
    node: str,
    done: Callable[[wire.Status], bool],
    within_s: float = 20.0,
    tls: aiomqtt.TLSParameters | None = None,
) -> wire.Status:
    """Wait for a status of `node` (retained or new) that satisfies `done`."""
    last: wire.Status | None = None
    async with mqtt_client(broker_url, tls) as client:
        await client.subscribe(wire.status_topic(site, node), qos=1)
        try:
            async with asyncio.timeout(within_s):
                async for message in client.messages:
                    if not isinstance(message.payload, bytes | bytearray):
                        continue
                    if not message.payload:
                        continue
                    last = wire.decode(wire.Status, message.payload)
                    if done(last):
                        return last
        except TimeoutError:
            pass
    msg = f"status of {site}/{node} never matched; last seen: {last}"
    raise TimeoutError(msg)


@dataclass
class AgentProcess:
    """One `chaos-agent run` subprocess, ended by its pid."""

    broker_url: str
    state_dir: Path
    node: str = "edge-1"
    site: str = "lab"
    labels: dict[str, str] = field(default_factory=dict)
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    # True: --insecure-allow-unsigned instead of --trust with the session key.
    insecure: bool = False
    # How the test side reaches an mqtts:// broker (the agent's own TLS
    # files go in extra_args).
    client_tls: aiomqtt.TLSParameters | None = None
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    started_at: datetime | None = None
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "agent not started"
        return self.process.pid

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "chaos_agent.cli",
            "run",
            "--broker",
            self.broker_url,
            "--node",
            self.node,
            "--site",
            self.site,
            "--state-dir",
            str(self.state_dir),
            "--metrics-listen",
            f"127.0.0.1:{self.metrics_port}",
            "--telemetry-interval",
            "1",
        ]
        for key, value in self.labels.items():
            argv += ["--label", f"{key}={value}"]
        if self.insecure:
            argv.append("--insecure-allow-unsigned")
        else:
            argv += ["--trust", str(session_key().public_path)]
        return [*argv, *self.extra_args]

    async def start(self, within_s: float = 30.0) -> wire.Status:
        """Spawn the agent and wait until it reports itself online."""
        self.spawn()
        try:
            return await self.wait_online(within_s)
        except BaseException:
            self.kill()
            raise

    def spawn(self) -> None:
        """Start the agent process without waiting for it."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.state_dir.parent / f"agent-{self.node}.log"
        env = {**os.environ, "CHAOS_AGENT_LOG_FORMAT": "json", **self.env}
        # Seconds of slack: the agent's clock and ours are the same clock,
        # but started_at is taken after the interpreter has started.
        self.started_at = datetime.now(UTC) - timedelta(seconds=1)
        with self.log_path.open("ab") as log:
            # Popen returns at once (fork + exec); nothing here waits on it.
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env
            )

    async def wait_online(self, within_s: float = 30.0) -> wire.Status:
        """Wait for this start's online status; raise at once, with the log,
        if the process exits first (a waiter that only read statuses would
        wait out `within_s` for an agent that died at start)."""
        started_at = self.started_at
        assert started_at is not None

        def fresh(status: wire.Status) -> bool:
            return (
                status.online
                and status.started_at is not None
                and status.started_at >= started_at
            )

        waiting = asyncio.ensure_future(
            wait_status(
                self.broker_url,
                self.site,
                self.node,
                fresh,
                within_s=within_s,
                tls=self.client_tls,
            )
        )
        try:
            while not waiting.done():
                if self.process is not None and self.process.poll() is not None:
                    msg = f"agent exited with {self.process.returncode}:\n{self.log()}"
                    raise RuntimeError(msg)
                await asyncio.wait({waiting}, timeout=0.2)
            return waiting.result()
        finally:
            waiting.cancel()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (the agent reverts everything) and wait; return the exit code."""
        return self._stop(signal.SIGTERM, timeout)

    def kill(self) -> int:
        """SIGKILL: the agent gets no chance to revert anything."""
        return self._stop(signal.SIGKILL, 10.0)

    def _stop(self, signum: int, timeout: float) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    async def restart(self, within_s: float = 30.0) -> wire.Status:
        self.terminate()
        return await self.start(within_s)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def healthz(self) -> tuple[int, dict[str, Any]]:
        with urlopen(f"{self.metrics_url}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())

    def metrics(self) -> str:
        with urlopen(f"{self.metrics_url}/metrics", timeout=5) as response:
            text: str = response.read().decode()
            return text

    def collector(self) -> AckCollector:
        return AckCollector(self.broker_url, self.site, self.node, self.client_tls)

    async def send(
        self,
        message: wire.Command | bytes,
        *,
        until: Callable[[list[wire.Ack]], bool] | None = None,
        topic: str | None = None,
        within_s: float = 15.0,
    ) -> list[wire.Ack]:
        """Publish a command (or raw bytes) to this agent's topic and return
        its acks once one is terminal (or `until(acks)` holds)."""
        payload = wire.encode(message) if isinstance(message, wire.Command) else message
        command_id = message.id if isinstance(message, wire.Command) else None

        def finished(acks: list[wire.Ack]) -> bool:
            if until is not None:
                return until(acks)
            return any(a.command_id == command_id and a.state in TERMINAL for a in acks)

        async with self.collector() as acks:
            await acks.publish(
                topic or wire.command_topic(self.site, self.node), payload
            )
            await acks.wait_for(finished, within_s)
            return acks.of(command_id) if command_id else list(acks.acks)


async def sweep_journal(state_dir: Path) -> int:
    """Revert whatever an agent's journal still holds, in this process, the
    way the agent does at start; return how many entries there were.

    For test cleanup after a test killed an agent and did not restart it.
    """
    journal = Journal(state_dir / "journal")
    if not journal.directory.exists():
        return 0
    context = FaultContext(policy=Policy(), state_dir=state_dir)
    entries = journal.entries()
    for entry in entries:
        driver = load_driver(entry.fault_type, context)
        await driver.revert(entry.record)
        journal.remove(entry.fault_id)
    return len(entries)


@contextlib.asynccontextmanager
async def started_agent(
    broker_url: str, workdir: Path, **options: Any
) -> AsyncIterator[AgentProcess]:
    """An agent that is online inside the block. After it, the agent gets
    SIGTERM (so it reverts its faults), and whatever a killed agent left in
    its journal is reverted too."""
    agent = AgentProcess(broker_url, workdir / "state", **options)
    await agent.start()
    try:
        yield agent
    finally:
        agent.terminate()
        await sweep_journal(agent.state_dir)
