"""Hostile input: thousands of malformed, truncated, oversized, wrongly typed
and forged messages to a running agent, through a real broker.

The generator is seeded, so a failure can be replayed; the figures (messages
sent, answers, RSS) are printed for the CI log.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest

from chaos_agent import wire
from tests.agent_process import AgentProcess, command, signed, started_agent
from tests.brokers import Broker

pytestmark = [pytest.mark.integration, pytest.mark.root]

MESSAGES = 12000
# Wait for the agent's answers every so often: its outbox holds 1000 acks.
BATCH = 400
SEED = 20261203
RSS_GROWTH_LIMIT = 10 * 2**20


@dataclass
class Fuzzer:
    """Makes hostile payloads; `answered` says which ones deserve an ack."""

    agent: AgentProcess
    rng: random.Random = field(default_factory=lambda: random.Random(SEED))
    attacker: wire.PrivateKey = field(default_factory=wire.generate_private_key)
    # Ids of the forged injects: a cgroup by any of these names means one ran.
    fault_ids: set[str] = field(default_factory=set)

    def topics(self) -> list[str]:
        site, node = self.agent.site, self.agent.node
        return [
            wire.command_topic(site, node),
            wire.command_topic(site, node),
            wire.command_topic(site),
            wire.command_topic(),
            wire.lease_topic("fuzz"),
            wire.halt_topic(),
            wire.halt_topic(site),
        ]

    def valid_command(self) -> dict[str, Any]:
        """An inject the agent would apply if only it were signed by a
        trusted key; the attacker's key signs it here."""
        now = datetime.now(UTC)
        message = wire.Command(
            issued_at=now,
            expires_at=now + timedelta(seconds=60),
            experiment="fuzz",
            action="inject",
            fault=wire.CpuFault(load_percent=1, workers=1),
            duration_s=5,
            lease_s=5,
        )
        forged = wire.sign(message, self.attacker)
        self.fault_ids.add(str(forged.id))
        body: dict[str, Any] = json.loads(wire.encode(forged))
        return body

    def payload(self) -> bytes:
        kind = self.rng.choice(self.kinds())
        return kind()

    def kinds(self) -> list[Callable[[], bytes]]:
        return [
            self.random_bytes,
            self.truncated,
            self.wrong_type,
            self.mutated_bytes,
            self.mutated_field,
            self.unsigned,
            self.nested,
            self.oversized if self.rng.random() < 0.02 else self.random_bytes,
        ]

    def random_bytes(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, 300))

    def truncated(self) -> bytes:
        raw = json.dumps(self.valid_command()).encode()
        return raw[: self.rng.randint(0, len(raw) - 1)]

    def wrong_type(self) -> bytes:
        body = self.valid_command()
        key = self.rng.choice(list(body))
        body[key] = self.rng.choice(
            [None, 1e308, -1, "", "x" * 5000, [], {}, True, [1, 2], {"a": {}}]
        )
        return json.dumps(body).encode()

    def mutated_bytes(self) -> bytes:
        raw = bytearray(json.dumps(self.valid_command()).encode())
        for _ in range(self.rng.randint(1, 8)):
            raw[self.rng.randrange(len(raw))] = self.rng.randrange(256)
        return bytes(raw)

    def mutated_field(self) -> bytes:
        """A forged command with one value changed after signing."""
        body = self.valid_command()
        changes: list[tuple[str, Any]] = [
            ("duration_s", 3000),
            ("experiment", "other"),
            ("action", "revert_all"),
            ("target", {"nodes": [self.agent.node]}),
            ("fault", {"type": "memory", "percent": 90}),
            ("expires_at", "2999-01-01T00:00:00Z"),
            ("id", str(uuid.uuid4())),
        ]
        key, value = self.rng.choice(changes)
        body[key] = value
        return json.dumps(body).encode()

    def unsigned(self) -> bytes:
        body = self.valid_command()
        del body["signature"]
        return json.dumps(body).encode()

    def nested(self) -> bytes:
        depth = self.rng.choice([100, 5000, 30000])
        return b"[" * depth + b"]" * self.rng.choice([0, depth])

    def oversized(self) -> bytes:
        body = self.valid_command()
        body["experiment"] = "x" * (wire.MAX_PAYLOAD_BYTES + 1000)
        return json.dumps(body).encode()

    def answered(self, topic: str, payload: bytes) -> bool:
        """Whether the agent owes this message an ack: every command on its
        own topic; on broadcast topics the unreadable ones and those whose
        target matches it (the rest are for other agents)."""
        agent = self.agent
        if topic == wire.command_topic(agent.site, agent.node):
            return True
        if topic not in (wire.command_topic(agent.site), wire.command_topic()):
            return False
        try:
            parsed = wire.decode(wire.Command, payload)
        except wire.WireError:
            return True
        return parsed.target.matches(agent.site, agent.node, agent.labels)

    def messages(self, count: int) -> Iterator[tuple[str, bytes]]:
        topics = self.topics()
        for _ in range(count):
            yield self.rng.choice(topics), self.payload()


def cgroups_named(names: set[str]) -> list[Path]:
    """Cgroups (v1 or v2) whose directory has one of `names`."""
    roots = Path("/sys/fs/cgroup").glob("**/aftershock")
    return [d for root in roots for d in root.iterdir() if d.name in names]


def at_least(count: int) -> Callable[[list[wire.Ack]], bool]:
    return lambda acks: len(acks) >= count


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


async def test_hostile_messages_change_nothing_and_leak_nothing(
    broker: Broker, tmp_path: Path
) -> None:
    """Test that thousands of hostile messages on the command, lease and halt
    topics leave the agent running and healthy, apply no fault, get a
    rejected ack each where one is owed, and do not grow its memory."""
    async with (
        started_agent(broker.url, tmp_path) as agent,
        agent.collector() as acks,
    ):
        fuzzer = Fuzzer(agent)
        owed = 0
        rss_after_first_batch = 0
        for sent, (topic, payload) in enumerate(fuzzer.messages(MESSAGES), 1):
            await acks.publish(topic, payload)
            owed += fuzzer.answered(topic, payload)
            if sent % BATCH == 0 or sent == MESSAGES:
                await acks.wait_for(at_least(owed), within_s=60)
                if rss_after_first_batch == 0 and sent >= 1000:
                    rss_after_first_batch = rss(agent.pid)
        rss_at_end = rss(agent.pid)

        ping = await agent.send(command("ping"))
        status, health = agent.healthz()
        metrics = agent.metrics()
        running = agent.running
        resume = signed(wire.Halt(halted=False))
        await acks.publish(wire.halt_topic(), wire.encode(resume))
        await acks.publish(wire.halt_topic(agent.site), wire.encode(resume))

    states = [a.state for a in acks.acks if a.command_id != ping[-1].command_id]
    applied_total = [
        line
        for line in metrics.splitlines()
        if line.startswith("aftershock_agent_faults_applied_total{")
    ]
    print(
        f"\nfuzz on {broker.kind}: sent {MESSAGES}, answers owed {owed}, "
        f"rejected acks {states.count('rejected')}, other acks "
        f"{len(states) - states.count('rejected')}, crashes {0 if running else 1}, "
        f"RSS after 1000 {rss_after_first_batch / 2**20:.1f} MiB, "
        f"at end {rss_at_end / 2**20:.1f} MiB"
    )
    assert running
    assert (status, health["broker_connected"]) == (200, True)
    assert ping[-1].state == "applied"
    assert states == ["rejected"] * owed
    assert all(line.endswith(" 0.0") for line in applied_total)
    assert cgroups_named(fuzzer.fault_ids) == []
    assert rss_at_end - rss_after_first_batch < RSS_GROWTH_LIMIT
