"""The MQTT fan-out floor: one command out, N QoS 1 answers back.

N subscriber processes (no-op: they answer at once and do nothing else) sit
on one broker; the coordinator side publishes a command on the broadcast
topic and times until every subscriber's QoS 1 answer has arrived. Real
agents cannot answer faster than this, so it is the floor under
inject-to-applied and halt-to-reverted.

`measure_round_trip` takes the subscriber command line, the command and the
test for an answer as arguments, so the same loop can time real agents:
start `chaos-agent run` processes, send a `wire.Command`, and count `applied`
acks.

    python -m bench.fanout                       # the table
    python -m bench.fanout subscriber URL INDEX  # one no-op subscriber
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiomqtt

from coordinator.mqtt import NODELAY, BrokerSettings, make_client
from tests.brokers import running_broker

COMMAND_TOPIC: Final = "aftershock/v1/_all/_all/cmd"
READY_FILTER: Final = "bench/+/ready"
ANSWER_FILTER: Final = "bench/+/ack"
SIZES: Final = (1, 10, 50)
ROUNDS: Final = 100

# (index, broker URL) -> argv of one subscriber process
SubscriberCommand = Callable[[int, str], Sequence[str]]
# round -> (topic, payload, token that answers carry)
MakeCommand = Callable[[int], tuple[str, bytes, bytes]]
# (topic, payload, token) -> does this message answer the round's command?
IsAnswer = Callable[[str, bytes, bytes], bool]
# (topic, payload) -> does this message say a subscriber is ready?
IsReady = Callable[[str, bytes], bool]


def noop_subscriber_cmd(index: int, broker_url: str) -> list[str]:
    return [sys.executable, "-m", "bench.fanout", "subscriber", broker_url, str(index)]


def noop_command(round_number: int) -> tuple[str, bytes, bytes]:
    token = uuid.uuid4().hex.encode()
    return COMMAND_TOPIC, token, token


def noop_answer(topic: str, payload: bytes, token: bytes) -> bool:
    return topic.endswith("/ack") and payload == token


def noop_ready(topic: str, payload: bytes) -> bool:
    return topic.endswith("/ready")


@dataclass(frozen=True)
class RoundTrips:
    subscribers: int
    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.samples_ms)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


async def measure_round_trip(
    subscribers: int,
    broker_url: str,
    make_subscriber_cmd: SubscriberCommand = noop_subscriber_cmd,
    *,
    rounds: int = ROUNDS,
    make_command: MakeCommand = noop_command,
    is_answer: IsAnswer = noop_answer,
    is_ready: IsReady = noop_ready,
    ready_filter: str = READY_FILTER,
    answer_filter: str = ANSWER_FILTER,
    ready_within_s: float = 120.0,
    answer_within_s: float = 10.0,
) -> RoundTrips:
    """Start `subscribers` processes, wait until each reported ready (distinct
    topics passing `is_ready`), then time `rounds` commands from publish until
    one answer per subscriber arrived. The processes are ended by pid."""
    processes: list[asyncio.subprocess.Process] = []
    try:
        async with make_client(BrokerSettings.from_url(broker_url)) as client:
            # Subscribed before any subscriber starts: "ready" is not retained,
            # and a fast subscriber would otherwise say it to nobody.
            await client.subscribe([(ready_filter, 1), (answer_filter, 1)])
            for i in range(subscribers):
                process = await asyncio.create_subprocess_exec(
                    *make_subscriber_cmd(i, broker_url),
                    stdout=asyncio.subprocess.DEVNULL,
                )
                processes.append(process)
            await _wait_ready(client, subscribers, is_ready, ready_within_s)
            samples = []
            for round_number in range(rounds):
                topic, payload, token = make_command(round_number)
                started = time.perf_counter()
                await client.publish(topic, payload, qos=1)
                await _wait_answers(
                    client, subscribers, token, is_answer, answer_within_s
                )
                samples.append((time.perf_counter() - started) * 1000)
                # Let the subscribers' acks and the broker settle between rounds.
                await asyncio.sleep(0.01)
            return RoundTrips(subscribers, samples)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def _wait_ready(
    client: aiomqtt.Client, expected: int, is_ready: IsReady, within_s: float
) -> None:
    ready: set[str] = set()
    async with asyncio.timeout(within_s):
        async for message in client.messages:
            payload = _bytes(message.payload)
            if is_ready(str(message.topic), payload):
                ready.add(str(message.topic))
            if len(ready) >= expected:
                return


async def _wait_answers(
    client: aiomqtt.Client,
    expected: int,
    token: bytes,
    is_answer: IsAnswer,
    within_s: float,
) -> None:
    answered: set[str] = set()
    async with asyncio.timeout(within_s):
        async for message in client.messages:
            if is_answer(str(message.topic), _bytes(message.payload), token):
                answered.add(str(message.topic))
            if len(answered) >= expected:
                return


def _bytes(payload: object) -> bytes:
    return bytes(payload) if isinstance(payload, bytes | bytearray) else b""


# ------------------------------------------------------------ the subscriber


def run_subscriber(broker_url: str, index: int) -> None:
    """One no-op subscriber: answer every command at once with a QoS 1 ack.

    Plain paho with its own thread, so 50 of them stay light on 2 CPUs.
    """
    from paho.mqtt import client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    settings = BrokerSettings.from_url(broker_url)
    ack_topic = f"bench/{index}/ack"

    def on_connect(client: paho.Client, *_: object) -> None:
        client.subscribe(COMMAND_TOPIC, qos=1)

    def on_subscribe(client: paho.Client, *_: object) -> None:
        client.publish(f"bench/{index}/ready", b"1", qos=1)

    def on_message(client: paho.Client, _: object, message: paho.MQTTMessage) -> None:
        client.publish(ack_topic, message.payload, qos=1)

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{index}")
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(settings.address.host, settings.address.port)
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(*NODELAY)
    client.loop_forever()


# ----------------------------------------------------------------- the table


async def _table(kind: str, sizes: Sequence[int], rounds: int) -> list[RoundTrips]:
    results = []
    with (
        tempfile.TemporaryDirectory() as workdir,
        running_broker(kind, Path(workdir)) as broker,
    ):
        for size in sizes:
            results.append(await measure_round_trip(size, broker.url, rounds=rounds))
    return results


def main() -> None:
    print(f"publish -> N QoS 1 answers, {ROUNDS} rounds, TCP_NODELAY on both sides")
    header = ("broker", "subscribers", "median ms", "p99 ms", "max ms")
    print("{:<10} {:>11} {:>10} {:>8} {:>8}".format(*header))
    for kind in ("mosquitto", "embedded"):
        for result in asyncio.run(_table(kind, SIZES, ROUNDS)):
            print(
                f"{kind:<10} {result.subscribers:>11} {result.median_ms:>10.2f} "
                f"{result.p99_ms:>8.2f} {max(result.samples_ms):>8.2f}",
                flush=True,
            )


if __name__ == "__main__":
    if sys.argv[1:2] == ["subscriber"]:
        run_subscriber(sys.argv[2], int(sys.argv[3]))
    else:
        main()
