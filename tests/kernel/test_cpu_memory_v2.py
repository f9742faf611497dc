"""The cpu and memory faults on cgroup v2, inside the kernel-tier guest.

The development machines have cgroup v1 cpu and memory; the guest mounts a
cgroup2 hierarchy at /sys/fs/cgroup with both controllers, which is where the
v2 code path (cpu.max, memory.max, subtree_control, cgroup.kill) is proven.
Python runs ~20x slower there, so the bounds are generous and the runs short.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from chaos_agent.cgroups import FaultCgroup, detect_layout, remove_all
from chaos_agent.faults.base import FaultContext, Record
from chaos_agent.faults.cpu import CpuDriver
from chaos_agent.faults.memory import MemoryDriver
from chaos_agent.policy import Policy
from chaos_agent.wire import CpuFault, MemoryFault

pytestmark = [pytest.mark.kernel]

MiB = 1024 * 1024


@pytest.fixture
def context(tmp_path: Path) -> Iterator[FaultContext]:
    layout = detect_layout()
    if layout is None or layout.version != "v2":
        pytest.skip("needs a cgroup v2 hierarchy with cpu and memory")
    name = f"aftershock-test-{uuid.uuid4().hex[:8]}"
    try:
        yield FaultContext(policy=Policy(), state_dir=tmp_path, cgroup_root=name)
    finally:
        remove_all(name, layout)


def assert_nothing_left(record: Record) -> None:
    cgroup = FaultCgroup.from_record(record["cgroup"])
    assert not cgroup.exists()
    for pid in record["pids"]:
        with contextlib.suppress(psutil.NoSuchProcess):
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_v2_cpu_fault_is_capped_and_reverted(context: FaultContext) -> None:
    """Test that on cgroup v2 a 50 % fault writes cpu.max, takes about half a
    core by cpu.stat, and reverts to no process and no cgroup."""
    driver = CpuDriver(context)
    fault = CpuFault(load_percent=50, workers=1)
    record = await driver.prepare("v2-cpu", fault)

    try:
        detail = await driver.apply("v2-cpu", fault, record)
        cgroup = FaultCgroup.from_record(record["cgroup"])
        cpu_max = (cgroup.dirs["cpu"] / "cpu.max").read_text().split()
        await asyncio.sleep(2.0)
        before, started = cgroup.cpu_usage_ns(), time.monotonic()
        await asyncio.sleep(4.0)
        after, elapsed = cgroup.cpu_usage_ns(), time.monotonic() - started
    finally:
        await driver.revert(record)

    assert detail["workers"] == 1
    assert int(cpu_max[0]) * 2 == int(cpu_max[1])
    assert before is not None and after is not None
    assert 25 < (after - before) / 1e9 / elapsed * 100 < 60
    assert_nothing_left(record)


async def test_v2_memory_fault_is_resident_and_reverted(
    context: FaultContext,
) -> None:
    """Test that on cgroup v2 a 32 MiB fault is resident under memory.max and
    reverts to no process and no cgroup."""
    driver = MemoryDriver(context)
    fault = MemoryFault(bytes=32 * MiB)
    record = await driver.prepare("v2-mem", fault)

    try:
        detail = await driver.apply("v2-mem", fault, record)
        memory_dir = FaultCgroup.from_record(record["cgroup"]).dirs["memory"]
        memory_max = int((memory_dir / "memory.max").read_text())
    finally:
        await driver.revert(record)

    assert abs(detail["resident_bytes"] - 32 * MiB) <= 3.2 * MiB
    assert memory_max == detail["limit_bytes"]
    assert_nothing_left(record)
