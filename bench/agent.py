"""One agent on a local Mosquitto: start-up time, idle RSS and CPU, and the
command round trip (ping -> applied ack) as the coordinator sees it.

The memory baseline, measured beside the agent on the same broker, is
`bench.bare_client`: the least any Python agent on this MQTT stack holds, so
the ratio says what the agent's own code and dependencies add.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from chaos_agent import wire
from tests.agent_process import AgentProcess, command
from tests.brokers import start_mosquitto

IDLE_WINDOW_S = 20.0
# The production default; the test helper's 1 s would quintuple the work.
TELEMETRY_INTERVAL = "5"
PINGS = 50


def process_tree(pid: int) -> list[psutil.Process]:
    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


async def measure(workdir: Path) -> dict[str, float]:
    broker = start_mosquitto(workdir)
    agent = AgentProcess(
        broker.url,
        workdir / "state",
        extra_args=["--telemetry-interval", TELEMETRY_INTERVAL],
    )
    baseline: asyncio.subprocess.Process | None = None
    try:
        started = time.monotonic()
        await agent.start()
        startup_s = time.monotonic() - started

        baseline = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.bare_client", broker.url,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert baseline.stdout is not None
        await asyncio.wait_for(baseline.stdout.readline(), 30)
        # Let the start-up work (imports, probes) settle before measuring.
        await asyncio.sleep(2)
        processes = process_tree(agent.pid)
        before = sum(sum(p.cpu_times()[:2]) for p in processes)
        await asyncio.sleep(IDLE_WINDOW_S)
        after = sum(sum(p.cpu_times()[:2]) for p in processes)
        rss = sum(p.memory_info().rss for p in processes)
        # USS: pages only this agent holds; RSS also counts shared library
        # pages (libcrypto, pydantic-core) other processes map as well.
        uss = sum(p.memory_full_info().uss for p in processes)
        bare = psutil.Process(baseline.pid).memory_full_info()

        round_trips, inside = [], []
        async with agent.collector() as acks:
            topic = wire.command_topic(agent.site, agent.node)
            for _ in range(PINGS):
                ping = command("ping")
                sent = time.perf_counter()
                await acks.publish(topic, wire.encode(ping))
                answer = await acks.wait_state(ping.id, "applied")
                round_trips.append((time.perf_counter() - sent) * 1000)
                inside.append(answer.timings.elapsed_ms)
    finally:
        if baseline is not None and baseline.returncode is None:
            baseline.kill()
            await baseline.wait()
        agent.terminate()
        broker.stop()

    return {
        "startup_s": startup_s,
        "idle_rss_mb": rss / 2**20,
        "idle_uss_mb": uss / 2**20,
        "baseline_rss_mb": bare.rss / 2**20,
        "baseline_uss_mb": bare.uss / 2**20,
        "idle_cpu_percent": (after - before) / IDLE_WINDOW_S * 100,
        "ping_ms_median": statistics.median(round_trips),
        "ping_ms_p95": statistics.quantiles(round_trips, n=20)[-1],
        "agent_ms_median": statistics.median(inside),
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as workdir:
        figures = asyncio.run(measure(Path(workdir)))
    print(f"agent start-up to online status: {figures['startup_s']:.2f} s")
    print(
        f"agent idle RSS:                  {figures['idle_rss_mb']:.1f} MB "
        f"(USS {figures['idle_uss_mb']:.1f} MB)"
    )
    print(
        f"bare aiomqtt client (baseline): {figures['baseline_rss_mb']:.1f} MB "
        f"(USS {figures['baseline_uss_mb']:.1f} MB); agent/baseline RSS "
        f"{figures['idle_rss_mb'] / figures['baseline_rss_mb']:.2f}x"
    )
    print(
        f"agent idle CPU over {IDLE_WINDOW_S:g} s (telemetry every "
        f"{TELEMETRY_INTERVAL} s): "
        f"{figures['idle_cpu_percent']:.2f} % of a core"
    )
    print(
        f"ping -> applied ack ({PINGS}x, Mosquitto): median "
        f"{figures['ping_ms_median']:.2f} ms, p95 {figures['ping_ms_p95']:.2f} ms"
    )
    print(
        "  of which inside the agent (received -> applied): median "
        f"{figures['agent_ms_median']:.3f} ms"
    )
    print(f"  load average while measuring: {psutil.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
