"""Network faults: how long apply and revert take, pyroute2 against `tc`.

The same change both ways, in a namespace created for the run: a root htb
`a5xx:` with a tbf under class 1 (what `BandwidthDriver` installs), then its
removal. tbf rather than netem because the development machines' kernel has
no sch_netem; the netlink work is the same shape. Three ways, median of 50:

- the driver (`BandwidthDriver.apply` / `.revert`: AsyncIPRoute in the
  target namespace, read-back included);
- raw pyroute2 in the agent's namespace (sync `IPRoute`, no read-back);
- the `tc` command as subprocesses (`ip netns exec` not used: `tc -n`).

Also the figure a partition costs: `nft -f -` applying and deleting a table.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import structlog
from pyroute2 import IPRoute

from chaos_agent.faults.bandwidth import BandwidthDriver
from chaos_agent.faults.base import FaultContext
from chaos_agent.faults.partition import PartitionDriver
from chaos_agent.netlink import UNSHAPED_BYTES_PER_S, link_names, owned_handle, rtnl
from chaos_agent.policy import Policy
from chaos_agent.wire import BandwidthFault, NetworkTarget, PartitionFault
from tests.integration.network_lab import Lab, two_namespaces

ROUNDS = 50


def quiet_context() -> FaultContext:
    """A driver context whose per-apply info logs stay out of the figures."""
    log = structlog.wrap_logger(
        structlog.PrintLogger(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    return FaultContext(policy=Policy(), state_dir=Path(), log=log)


def median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:7.2f} ms"


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


async def driver_rounds(lab: Lab) -> tuple[list[float], list[float]]:
    driver = BandwidthDriver(quiet_context())
    fault = BandwidthFault(
        rate_kbit=10_000, where=NetworkTarget(netns=lab.ns_a, interface=lab.if_a)
    )
    applies, reverts = [], []
    for _ in range(ROUNDS):
        record = await driver.prepare(str(uuid.uuid4()), fault)
        start = time.perf_counter()
        await driver.apply(record["fault_id"], fault, record)
        applies.append(time.perf_counter() - start)
        start = time.perf_counter()
        await driver.revert(record)
        reverts.append(time.perf_counter() - start)
    return applies, reverts


def pyroute2_rounds(lab: Lab) -> tuple[list[float], list[float]]:
    handle = owned_handle("bench")
    applies, reverts = [], []
    with IPRoute(netns=lab.ns_a, flags=0) as ipr:
        index = ipr.link_lookup(ifname=lab.if_a)[0]

        def apply() -> None:
            ipr.tc("add", "htb", index=index, handle=handle, default=1)
            for band in (handle | 1, handle | 2):
                ipr.tc("add-class", "htb", index=index, handle=band, parent=handle,
                       rate=UNSHAPED_BYTES_PER_S)  # fmt: skip
            ipr.tc("add", "tbf", index=index, parent=handle | 1,
                   rate=1_250_000, burst=32768, latency=50_000)  # fmt: skip

        def revert() -> None:
            ipr.tc("del", "htb", index=index, handle=handle, parent=0xFFFFFFFF)

        for _ in range(ROUNDS):
            applies.append(timed(apply))
            reverts.append(timed(revert))
    return applies, reverts


def tc_rounds(lab: Lab) -> tuple[list[float], list[float]]:
    dev = ["dev", lab.if_a]

    def tc(*args: str) -> None:
        # The kernel warns on stderr that a 100gbit class's quantum is big
        # (the driver's netlink path gets the same note, silently): keep it
        # out of the figures.
        subprocess.run(["tc", "-n", lab.ns_a, *args], check=True, capture_output=True)

    def apply() -> None:
        tc("qdisc", "add", *dev, "root", "handle", "a5a5:", "htb", "default", "1")
        for band in ("a5a5:1", "a5a5:2"):
            tc("class", "add", *dev, "parent", "a5a5:", "classid", band,
               "htb", "rate", "100gbit")  # fmt: skip
        tc("qdisc", "add", *dev, "parent", "a5a5:1", "tbf",
           "rate", "10mbit", "burst", "32k", "latency", "50ms")  # fmt: skip

    def revert() -> None:
        tc("qdisc", "del", *dev, "root")

    applies, reverts = [], []
    for _ in range(ROUNDS):
        applies.append(timed(apply))
        reverts.append(timed(revert))
    return applies, reverts


async def open_rounds(lab: Lab) -> tuple[list[float], list[float]]:
    """Opening AsyncIPRoute in the namespace and one link dump, which the
    driver does once per apply and once per revert (pyroute2 forks a child
    to make the socket on the first request)."""
    opens = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        async with rtnl(lab.path_a) as ipr:
            await link_names(ipr)
        opens.append(time.perf_counter() - start)
    return opens, opens


async def partition_rounds(lab: Lab) -> tuple[list[float], list[float]]:
    driver = PartitionDriver(quiet_context())
    fault = PartitionFault(peers=[lab.addr_b], where=NetworkTarget(netns=lab.ns_a))
    applies, reverts = [], []
    for _ in range(ROUNDS):
        record = await driver.prepare(str(uuid.uuid4()), fault)
        start = time.perf_counter()
        await driver.apply(record["fault_id"], fault, record)
        applies.append(time.perf_counter() - start)
        start = time.perf_counter()
        await driver.revert(record)
        reverts.append(time.perf_counter() - start)
    return applies, reverts


def main() -> None:
    with two_namespaces(subnet=9) as lab:
        rows = [
            (
                "BandwidthDriver (async, netns, read-back)",
                asyncio.run(driver_rounds(lab)),
            ),
            (
                "  of which: open in the netns + link dump",
                asyncio.run(open_rounds(lab)),
            ),
            ("pyroute2 IPRoute (same qdiscs)", pyroute2_rounds(lab)),
            ("tc subprocesses (4 add / 1 del)", tc_rounds(lab)),
            ("PartitionDriver (nft -f -, nsenter)", asyncio.run(partition_rounds(lab))),
        ]
    print(f"htb a5xx: + tbf on a veth in a namespace, median of {ROUNDS}")
    print(f"{'way':44} {'apply':>10} {'revert':>10}")
    for label, (applies, reverts) in rows:
        print(f"{label:44} {median_ms(applies)} {median_ms(reverts)}")


if __name__ == "__main__":
    main()
