"""Real agents on one broker: inject-to-applied and halt-to-all-reverted.

For 1, 10 and 50 `chaos-agent run` processes on one Mosquitto, in the same
run and on the same broker, this times:

- the floor: the bare MQTT fan-out (`bench.fanout`, no-op subscribers that
  answer a command with one QoS 1 message);
- ping: one signed broadcast `ping` until every agent's `applied` ack is in
  (the agent's whole admission path: parse, verify, target, ack);
- inject: a signed `cpu` fault (1 worker at 1 %) to every agent's own topic,
  until every `applied` ack is in (includes creating the cgroup and starting
  the stressor, and verifying it runs);
- halt: one retained signed halt until every `reverted` ack is in (includes
  killing the stressor and removing its cgroup).

Beside the ping rounds it reads every agent's CPU time (/proc/PID/stat) and
prints the CPU one agent spends per ping: with N agents on C CPUs, N times
that over C is a lower bound of the ping's time, whatever the broker does.

Agents verify Ed25519 signatures, as in production.

    python -m bench fleet
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import aiomqtt

from bench.fanout import measure_round_trip
from chaos_agent import wire
from coordinator.mqtt import BrokerSettings, make_client
from tests.agent_process import AgentProcess, signed, sweep_journal
from tests.brokers import running_broker

# BENCH_FLEET_SIZES=1,3 for a quick look.
SIZES: Final = tuple(
    int(n) for n in os.environ.get("BENCH_FLEET_SIZES", "1,10,50").split(",")
)
# p99 is the nearest-rank percentile: over 20 rounds it is simply the slowest
# one, and one scheduling hiccup on 2 CPUs decides it. 100 rounds on both
# sides make the floor and the ping comparable tails.
FLOOR_ROUNDS: Final = 100
PING_ROUNDS: Final = 100
INJECT_ROUNDS: Final = 5
START_WITHIN_S: Final = 180.0
SITE: Final = "bench"


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class AckWaiter:
    """Counts acks by command id on one subscription to every ack topic."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client

    async def until(
        self,
        done: Callable[[wire.Ack], bool],
        expected: int,
        within_s: float = 60.0,
    ) -> None:
        nodes: set[str] = set()
        async with asyncio.timeout(within_s):
            async for message in self.client.messages:
                if not str(message.topic).endswith("/ack"):
                    continue
                payload = message.payload
                if not isinstance(payload, bytes | bytearray):
                    continue
                ack = wire.decode(wire.Ack, payload)
                if done(ack):
                    nodes.add(ack.node)
                if len(nodes) >= expected:
                    return


def _command(action: str, **fields: object) -> wire.Command:
    now = datetime.now(UTC)
    return signed(
        wire.Command.model_validate(
            {
                "issued_at": now,
                "expires_at": now + timedelta(seconds=60),
                "experiment": "bench",
                "action": action,
                **fields,
            }
        )
    )


async def _ping(client: aiomqtt.Client, waiter: AckWaiter, agents: int) -> float:
    ping = _command("ping")
    started = time.perf_counter()
    await client.publish(wire.command_topic(), wire.encode(ping), qos=1)
    await waiter.until(
        lambda a: a.command_id == ping.id and a.state == "applied", agents
    )
    return (time.perf_counter() - started) * 1000


async def _inject_then_halt(
    client: aiomqtt.Client, waiter: AckWaiter, nodes: Sequence[str]
) -> tuple[float, float]:
    ids: set[uuid.UUID] = set()
    commands = []
    for node in nodes:
        command = _command(
            "inject",
            target=wire.Target(sites=[SITE], nodes=[node]),
            fault=wire.CpuFault(load_percent=1, workers=1),
            duration_s=60.0,
            lease_s=60.0,
        )
        ids.add(command.id)
        commands.append((wire.command_topic(SITE, node), wire.encode(command)))

    started = time.perf_counter()
    for topic, payload in commands:
        await client.publish(topic, payload, qos=1)
    await waiter.until(
        lambda a: a.command_id in ids and a.state == "applied", len(nodes)
    )
    applied_ms = (time.perf_counter() - started) * 1000

    halt = wire.encode(signed(wire.Halt(halted=True, reason="bench")))
    started = time.perf_counter()
    await client.publish(wire.halt_topic(), halt, qos=1, retain=True)
    await waiter.until(
        lambda a: a.state == "reverted" and (a.fault_id in ids or a.command_id in ids),
        len(nodes),
    )
    reverted_ms = (time.perf_counter() - started) * 1000

    resume = wire.encode(signed(wire.Halt(halted=False)))
    await client.publish(wire.halt_topic(), resume, qos=1, retain=True)
    # Agents must have seen the resume before the next inject.
    await asyncio.sleep(1.0)
    return applied_ms, reverted_ms


async def _measure(size: int, workdir: Path) -> dict[str, list[float]]:
    with running_broker("mosquitto", workdir) as broker:
        floor = await measure_round_trip(size, broker.url, rounds=FLOOR_ROUNDS)
        agents = [
            AgentProcess(
                broker.url,
                workdir / f"agent-{i}",
                node=f"node-{i}",
                site=SITE,
                extra_args=("--telemetry-interval", "30"),
            )
            for i in range(size)
        ]
        try:
            # Start in small batches: 50 interpreters importing at once on 2
            # CPUs would measure start-up, not the control plane.
            for batch in range(0, size, 10):
                # Start-up is not what this measures: on a busy machine ten
                # agents coming up at once once took longer than the default
                # 30 s, so they get minutes.
                batch_agents = agents[batch : batch + 10]
                started = await asyncio.gather(
                    *(a.start(START_WITHIN_S) for a in batch_agents),
                    return_exceptions=True,
                )
                for agent, outcome in zip(batch_agents, started, strict=True):
                    if isinstance(outcome, BaseException):
                        print(f"{agent.node} did not start; its log:\n{agent.log()}")
                        raise outcome
            settings = BrokerSettings.from_url(broker.url)
            async with make_client(settings) as client:
                await client.subscribe(wire.ACK_WILDCARD, qos=1)
                waiter = AckWaiter(client)
                cpu_before = sum(cpu_seconds(a.pid) for a in agents)
                pings = [await _ping(client, waiter, size) for _ in range(PING_ROUNDS)]
                cpu_spent = sum(cpu_seconds(a.pid) for a in agents) - cpu_before
                injects, halts = [], []
                for _ in range(INJECT_ROUNDS):
                    applied_ms, reverted_ms = await _inject_then_halt(
                        client, waiter, [a.node for a in agents]
                    )
                    injects.append(applied_ms)
                    halts.append(reverted_ms)
                await client.publish(wire.halt_topic(), b"", qos=1, retain=True)
        finally:
            for agent in agents:
                agent.terminate()
            for agent in agents:
                await sweep_journal(agent.state_dir)
    return {
        "floor": floor.samples_ms,
        "ping": pings,
        "inject": injects,
        "halt": halts,
        "agent_cpu_ms_per_ping": [cpu_spent * 1000 / (PING_ROUNDS * size)],
    }


def main() -> None:
    print(
        f"{SITE}: real agents on one Mosquitto, signed commands; floor = bare "
        "fan-out to no-op subscribers in the same run"
    )
    header = ("agents", "what", "rounds", "median ms", "p99 ms", "p99/floor p99")
    print("{:>6} {:<28} {:>6} {:>10} {:>8} {:>14}".format(*header))
    labels = {
        "floor": "fan-out floor (no-op)",
        "ping": "ping -> all applied",
        "inject": "inject cpu -> all applied",
        "halt": "halt -> all reverted",
    }
    for size in SIZES:
        with tempfile.TemporaryDirectory() as workdir:
            results = asyncio.run(_measure(size, Path(workdir)))
        floor_p99 = percentile(results["floor"], 0.99)
        for key, label in labels.items():
            samples = results[key]
            p99 = percentile(samples, 0.99)
            print(
                f"{size:>6} {label:<28} {len(samples):>6} "
                f"{statistics.median(samples):>10.1f} {p99:>8.1f} "
                f"{p99 / floor_p99:>14.1f}",
                flush=True,
            )
        per_ping = results["agent_cpu_ms_per_ping"][0]
        print(
            f"{size:>6} agent CPU per ping: {per_ping:.2f} ms each; "
            f"{size} agents on {os.cpu_count()} CPUs: at least "
            f"{per_ping * size / (os.cpu_count() or 1):.0f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
