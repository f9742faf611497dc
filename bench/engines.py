"""Latency engines side by side: what netem and the proxy add, from the client.

Two throwaway namespaces joined by veth (the proxy tests' `netns_pair`): an
HTTP service in one, the client in the other. A latency fault of 50 ms and of
200 ms is applied to the service's namespace by the agent's own latency
driver in a helper process of its own (as in an agent), with `engine: netem`
(on the service's veth, delaying what the service sends) or `engine: proxy`
(nftables redirect of the service's port, delaying the requests). Two
figures per fault, each the median of the samples minus the median without
the fault:

- request: a GET on a keep-alive connection opened after the apply; the
  round trip both engines delay once;
- new connection: connect + GET + close; netem also holds the SYN-ACK, so
  it adds the delay twice, the proxy (which accepts at once) once.

Where each half runs: netem only exists in the kernel tier's QEMU guest
(this machine's kernel has no sch_netem), so `main()` boots the guest with
`tests/kernel/run.sh` and measures BOTH engines there, like for like; it
then measures the proxy on this host as well. The guest runs Python ~20x
slower, which inflates the proxy's own overhead there (the proxy is Python,
netem is the kernel); the host row shows the proxy at full speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from chaos_agent.delay_proxy import NetnsSockets
from chaos_agent.wire import LatencyFault, NetworkTarget
from tests.integration.proxy_netns import (
    SERVICE_ADDRESS,
    HttpConnection,
    NetnsPair,
    module_process,
    netns_pair,
    read_line,
    service,
    stop,
    timed_request,
)

REPO: Final = Path(__file__).resolve().parents[1]
PORT: Final = 8080
DELAYS_MS: Final = (50.0, 200.0)
ENGINES: Final = ("netem", "proxy")
SAMPLES: Final = 15
# The line the guest prints and `main()` parses.
MARKER: Final = "AFTERSHOCK-ENGINES-JSON "
# Python and its imports crawl in the guest: a helper may take minutes.
HELPER_START_S: Final = 600.0

Row = dict[str, float | str]


class EngineUnavailable(RuntimeError):
    """The latency driver refused the engine here; the text says why."""


@contextlib.contextmanager
def applied(pair: NetnsPair, engine: str, delay_ms: float) -> Iterator[None]:
    """The latency fault applied by the agent's latency driver in a helper
    process; reverted when the block ends (the helper's stdin closes)."""
    where = NetworkTarget(netns=pair.service)
    if engine == "netem":
        where = NetworkTarget(netns=pair.service, interface="vsvc")
    fault = LatencyFault(
        delay_ms=delay_ms,
        engine="netem" if engine == "netem" else "proxy",
        ports=[PORT] if engine == "proxy" else [],
        direction="ingress" if engine == "proxy" else "both",
        where=where,
    )
    helper = module_process(None, "apply", fault.model_dump_json(), "latency")
    try:
        try:
            read_line(helper, timeout=HELPER_START_S)
        except AssertionError as exc:
            # The helper died before applying: its last words say why.
            last = str(exc).strip().splitlines()[-1:] or ["no output"]
            raise EngineUnavailable(last[0][-300:]) from None
        yield
    finally:
        if helper.stdin is not None:
            helper.stdin.close()
        # The helper answers with its revert outcome; a killed helper would
        # leave the fault to the record, so wait for the answer.
        with contextlib.suppress(AssertionError):
            read_line(helper, timeout=HELPER_START_S)
        stop(helper)


async def keepalive_ms(client: NetnsSockets) -> float:
    """Median of GETs on one keep-alive connection, connect excluded."""
    connection = await HttpConnection.open(client, SERVICE_ADDRESS, PORT)
    samples = []
    try:
        for _ in range(SAMPLES):
            started = time.perf_counter()
            await connection.get()
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        await connection.close()
    return statistics.median(samples)


async def new_connection_ms(client: NetnsSockets) -> float:
    samples = [
        await timed_request(client, SERVICE_ADDRESS, PORT) for _ in range(SAMPLES)
    ]
    return statistics.median(samples)


def measure(pair: NetnsPair, engines: tuple[str, ...], where: str) -> list[Row]:
    """Added latency per engine and delay, measured from the client."""
    client = NetnsSockets(pair.client_path)
    rows: list[Row] = []
    try:
        base_request = asyncio.run(keepalive_ms(client))
        base_connect = asyncio.run(new_connection_ms(client))
        for engine in engines:
            for delay in DELAYS_MS:
                row: Row = {
                    "where": where,
                    "engine": engine,
                    "asked_ms": delay,
                    "base_request_ms": round(base_request, 1),
                }
                try:
                    with applied(pair, engine, delay):
                        request = asyncio.run(keepalive_ms(client))
                        connect = asyncio.run(new_connection_ms(client))
                except EngineUnavailable as exc:
                    rows.append({**row, "unavailable": str(exc)})
                    break
                row["request_added_ms"] = round(request - base_request, 1)
                row["connection_added_ms"] = round(connect - base_connect, 1)
                rows.append(row)
    finally:
        client.close()
    return rows


@contextlib.contextmanager
def slow_service(pair: NetnsPair) -> Iterator[None]:
    """The proxy tests' HTTP service, given minutes to start (it imports
    aiohttp, ~1 s here and over a minute in the guest)."""
    process = module_process(pair.service, "serve", str(PORT))
    try:
        assert read_line(process, timeout=HELPER_START_S) == "ready"
        yield
    finally:
        stop(process)


@pytest.mark.kernel
def test_guest_engine_figures() -> None:
    """Test that both engines add latency in the guest, and print the figures
    for `main()` (run only when named: `-k guest_engine_figures`)."""
    with netns_pair() as pair, slow_service(pair):
        rows = measure(pair, ENGINES, "qemu guest")
    print(f"\n{MARKER}{json.dumps(rows)}", flush=True)
    measured = [r for r in rows if "request_added_ms" in r]
    assert measured
    assert all(
        float(r["request_added_ms"]) > float(r["asked_ms"]) / 2 for r in measured
    )


def guest_rows() -> tuple[list[Row], str]:
    """Both engines measured in the kernel tier's guest, or why not."""
    if os.geteuid() != 0:
        return [], "needs root (QEMU's root share, namespaces)"
    if shutil.which("qemu-system-x86_64") is None:
        return [], "qemu-system-x86_64 is not installed (make test-kernel sets it up)"
    done = subprocess.run(
        [
            "bash",
            str(REPO / "tests/kernel/run.sh"),
            sys.executable,
            "-k",
            "guest_engine_figures",
            str(REPO / "bench/engines.py"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    output = done.stdout + done.stderr
    for line in output.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :]), ""
        if line.startswith("SKIPPED"):
            return [], line
    errors = [x for x in output.splitlines() if x.startswith("E ")][:5]
    tail = " | ".join(re.sub(r"\s+", " ", x) for x in errors + output.splitlines()[-2:])
    return [], f"the guest printed no figures (exit {done.returncode}): {tail}"


def print_table(rows: list[Row]) -> None:
    print(
        f"{'measured in':<12} {'engine':<6} {'asked ms':>8} "
        f"{'request +ms':>12} {'new conn +ms':>13} {'base req ms':>12}"
    )
    for row in rows:
        if "unavailable" in row:
            print(
                f"{row['where']!s:<12} {row['engine']!s:<6} unavailable: "
                f"{row['unavailable']}"
            )
            continue
        print(
            f"{row['where']!s:<12} {row['engine']!s:<6} {row['asked_ms']:>8} "
            f"{row['request_added_ms']:>12} {row['connection_added_ms']:>13} "
            f"{row['base_request_ms']:>12}"
        )


def main() -> None:
    if os.geteuid() != 0:
        print("skipped: needs root (network namespaces, nftables, QEMU)")
        return
    started = time.monotonic()
    rows, skipped = guest_rows()
    if skipped:
        print(f"netem column skipped: {skipped}")
    else:
        print(f"guest half (netem and proxy) took {time.monotonic() - started:.0f} s")

    with netns_pair() as pair, service(pair, PORT):
        rows += measure(pair, ("proxy",), "this host")
    print_table(rows)
    print(
        "request: GET on a keep-alive connection opened after apply; new conn: "
        "connect+GET, where netem also delays the SYN-ACK (twice the delay)"
    )


if __name__ == "__main__":
    main()
