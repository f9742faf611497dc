"""How fast the open-loop load generator can go on one core, and how close to
its schedule it stays.

A tiny aiohttp server runs in a subprocess (so it does not share the
generator's core); the generator then runs at rising rates for a few seconds
each. Printed per rate: requests sent and answered, achieved rate, the
generator's CPU per request (and so the rate one free core could drive), its
own worst launch lag, and p50/p99 of the measured latency. A growing launch
lag at a rate means the generator (or this busy machine), not the system under
test, has become the limit; a growing p99 alone points at the server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

from coordinator.analysis import percentile
from coordinator.load import Clock, LoadGenerator, Replica
from tests.brokers import free_port

RATES = (250, 500, 1000, 1500)
SECONDS = 4.0

SERVER = """
import sys
from aiohttp import web

async def take(request):
    return web.Response(text='{"allowed": true}')

app = web.Application()
app.router.add_post("/v1/take/{key}", take)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None,
            access_log=None)
"""


def _wait(port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    msg = f"bench server did not start on port {port}"
    raise RuntimeError(msg)


async def _one_rate(url: str, rate: int) -> None:
    load = LoadGenerator([Replica("bench", url)], ["k"], rate, Clock(), timeout_s=5)
    cpu_before = time.process_time()
    await load.run(duration_s=SECONDS)
    cpu = time.process_time() - cpu_before

    latencies = [r.latency_s * 1000 for r in load.records if not r.failed]
    failed = sum(1 for r in load.records if r.failed)
    p50 = percentile(latencies, 50) or 0.0
    p99 = percentile(latencies, 99) or 0.0
    print(
        f"rate {rate:5d}/s: sent {load.stats.sent:5d}, failed {failed:4d}, "
        f"achieved {len(load.records) / SECONDS:7.1f}/s, "
        f"generator CPU {cpu / max(load.stats.sent, 1) * 1e6:4.0f} us/request "
        f"(one free core: ~{load.stats.sent / max(cpu, 1e-9):5.0f}/s), "
        f"max launch lag {load.stats.max_launch_lag_s * 1000:6.1f} ms, "
        f"latency p50 {p50:6.2f} ms p99 {p99:7.2f} ms",
        flush=True,
    )


def main() -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        _wait(port)
        print(f"open-loop load against a local aiohttp server, {SECONDS:g}s per rate")
        for rate in RATES:
            asyncio.run(_one_rate(f"http://127.0.0.1:{port}", rate))
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
