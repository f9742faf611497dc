"""Figures of the proxy latency engine: added latency and throughput ceiling.

Two throwaway namespaces joined by veth (needs root): an aiohttp service in
one, the client in the other, the proxy in a process of its own (as in the
agent) with its rules in the service's namespace. Prints

- added latency: median of new-connection requests with the proxy at 50 and
  200 ms, minus the median without it;
- throughput: bulk upload MB/s (through the delayed direction) and keep-alive
  requests/s at 1, 10 and 100 concurrent connections, direct and through the
  proxy at 0 ms, side by side.

Client, proxy and service share the machine's CPUs, so the figures are
ceilings of this whole setup, not of the proxy alone; the direct column shows
how much of it the service and client take.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from collections.abc import Iterator

from chaos_agent.delay_proxy import NetnsSockets
from chaos_agent.wire import LatencyFault, NetworkTarget

# The namespace and service helpers of the integration tests, reused rather
# than copied: the benchmark measures exactly what the tests exercise.
from tests.integration.proxy_netns import (
    SERVICE_ADDRESS,
    NetnsPair,
    module_process,
    netns_pair,
    read_line,
    requests_until,
    revert_in_fresh_process,
    service,
    stop,
    timed_request,
    upload,
)

PORT = 8080
LATENCY_SAMPLES = 15
CONCURRENCY = (1, 10, 100)
UPLOAD_TOTAL_BYTES = 256 * 1024 * 1024
REQUEST_SECONDS = 3.0


@contextlib.contextmanager
def proxied(pair: NetnsPair, delay_ms: float) -> Iterator[None]:
    """The proxy engine applied to the service namespace, in its own process."""
    fault = LatencyFault(
        delay_ms=delay_ms,
        engine="proxy",
        ports=[PORT],
        direction="ingress",
        where=NetworkTarget(netns=pair.service),
    )
    helper = module_process(None, "apply", fault.model_dump_json())
    record = None
    try:
        record = json.loads(read_line(helper))
        yield
    finally:
        if helper.stdin is not None:
            helper.stdin.close()
        with contextlib.suppress(AssertionError):
            read_line(helper, timeout=10)
        stop(helper)
        if record is not None:
            revert_in_fresh_process(record)


async def latency_ms(client: NetnsSockets) -> float:
    samples = [
        await timed_request(client, SERVICE_ADDRESS, PORT)
        for _ in range(LATENCY_SAMPLES)
    ]
    return statistics.median(samples)


async def upload_mb_s(client: NetnsSockets, connections: int) -> float:
    each = UPLOAD_TOTAL_BYTES // connections
    started = time.perf_counter()
    await asyncio.gather(
        *(upload(client, SERVICE_ADDRESS, PORT, each) for _ in range(connections))
    )
    return each * connections / (time.perf_counter() - started) / 1e6


async def requests_per_s(client: NetnsSockets, connections: int) -> float:
    deadline = time.monotonic() + REQUEST_SECONDS
    answered = await asyncio.gather(
        *(
            requests_until(client, SERVICE_ADDRESS, PORT, deadline)
            for _ in range(connections)
        )
    )
    return sum(answered) / REQUEST_SECONDS


async def throughput(client: NetnsSockets) -> dict[int, tuple[float, float]]:
    return {
        n: (await upload_mb_s(client, n), await requests_per_s(client, n))
        for n in CONCURRENCY
    }


def run(pair: NetnsPair) -> None:
    client = NetnsSockets(pair.client_path)
    try:
        direct = asyncio.run(latency_ms(client))
        print(f"direct request latency (median of {LATENCY_SAMPLES}): {direct:.2f} ms")
        print(f"{'asked ms':>9} {'measured ms':>12} {'added ms':>9} {'error':>7}")
        for asked in (50.0, 200.0):
            with proxied(pair, asked):
                measured = asyncio.run(latency_ms(client))
            added = measured - direct
            error = (added - asked) / asked * 100
            print(f"{asked:9.0f} {measured:12.2f} {added:9.2f} {error:+6.1f}%")

        direct_tp = asyncio.run(throughput(client))
        with proxied(pair, 0.0):
            proxy_tp = asyncio.run(throughput(client))
        with proxied(pair, 200.0):
            one_stream_200 = asyncio.run(upload_mb_s(client, 1))
    finally:
        client.close()

    print()
    print(
        f"{'conns':>5} {'direct MB/s':>12} {'proxy MB/s':>11} "
        f"{'direct req/s':>13} {'proxy req/s':>12}"
    )
    for n in CONCURRENCY:
        d_mb, d_rq = direct_tp[n]
        p_mb, p_rq = proxy_tp[n]
        print(f"{n:5d} {d_mb:12.1f} {p_mb:11.1f} {d_rq:13.0f} {p_rq:12.0f}")
    print(
        f"one stream through the proxy at 200 ms: {one_stream_200:.1f} MB/s "
        "(capped by the bytes a stream may hold back)"
    )


def main() -> None:
    if os.geteuid() != 0:
        print("skipped: needs root (network namespaces, nftables)")
        return
    with netns_pair() as pair, service(pair, PORT):
        run(pair)


if __name__ == "__main__":
    main()
