"""The cpu and memory faults on the real kernel, driven like the agent does.

Needs root. Each test has its own cgroup root, removed with everything in it
whatever happens; load is measured from the fault cgroup's own CPU counter.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from chaos_agent import stressors
from chaos_agent.cgroups import FaultCgroup, detect_layout, remove_all
from chaos_agent.faults.base import FaultContext, FaultRejected, Record
from chaos_agent.faults.cpu import CpuDriver, node_cpus
from chaos_agent.faults.memory import MemoryDriver
from chaos_agent.policy import Policy, PolicyViolation
from chaos_agent.wire import CpuFault, MemoryFault

pytestmark = [pytest.mark.integration, pytest.mark.root]

MiB = 1024 * 1024


@pytest.fixture
def context(tmp_path: Path) -> Iterator[FaultContext]:
    """A fault context with a cgroup root of this test's own."""
    layout = detect_layout()
    if layout is None or not (layout.has("cpu") and layout.has("memory")):
        pytest.skip("this node has no cgroup cpu and memory controllers")
    name = f"aftershock-test-{uuid.uuid4().hex[:8]}"
    try:
        yield FaultContext(policy=Policy(), state_dir=tmp_path, cgroup_root=name)
    finally:
        remove_all(name, layout)


def is_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_nothing_left(record: Record) -> None:
    cgroup = FaultCgroup.from_record(record["cgroup"])
    assert not cgroup.exists()
    assert not any(is_alive(pid) for pid in record["pids"])


async def wait_until_dead(pids: list[int], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(is_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def measured_load_percent(record: Record, seconds: float) -> float:
    cgroup = FaultCgroup.from_record(record["cgroup"])
    before, started = cgroup.cpu_usage_ns(), time.monotonic()
    await asyncio.sleep(seconds)
    after, elapsed = cgroup.cpu_usage_ns(), time.monotonic() - started
    assert before is not None and after is not None
    return (after - before) / 1e9 / elapsed * 100


async def test_cpu_fault_holds_its_load_and_reverts_clean(
    context: FaultContext,
) -> None:
    """Test that a 50 % fault with one worker takes about half a core,
    measured from its cgroup, and that revert leaves no process and no
    cgroup."""
    driver = CpuDriver(context)
    fault = CpuFault(load_percent=50, workers=1)
    driver.check(fault)
    record = await driver.prepare("cpu-1", fault)

    detail = await driver.apply("cpu-1", fault, record)
    await asyncio.sleep(0.5)
    load = await measured_load_percent(record, 3.0)
    reverted = await driver.revert(record)

    assert detail["workers"] == 1 and len(detail["pids"]) == 1
    assert 35 < load < 65
    assert reverted["killed"] == 1
    assert_nothing_left(record)


async def test_cpu_fault_starts_one_worker_per_cpu_in_its_cgroup(
    context: FaultContext,
) -> None:
    """Test that a fault without a worker count starts one per CPU, every one
    inside the fault's cgroup, under a quota of the summed share."""
    driver = CpuDriver(context)
    fault = CpuFault(load_percent=10)
    record = await driver.prepare("cpu-2", fault)

    try:
        detail = await driver.apply("cpu-2", fault, record)
        in_cgroup = FaultCgroup.from_record(record["cgroup"]).pids()
    finally:
        await driver.revert(record)

    assert len(detail["pids"]) == node_cpus()
    assert set(detail["pids"]) == in_cgroup
    assert detail["quota_us"] == node_cpus() * detail["period_us"] // 10


async def test_revert_twice_is_success(context: FaultContext) -> None:
    """Test that reverting a reverted fault succeeds and changes nothing."""
    driver = CpuDriver(context)
    fault = CpuFault(load_percent=20, workers=1)
    record = await driver.prepare("cpu-3", fault)
    await driver.apply("cpu-3", fault, record)

    await driver.revert(record)
    again = await driver.revert(record)

    assert again["killed"] == 0
    assert_nothing_left(record)


async def test_revert_of_a_fault_never_applied_is_success(
    context: FaultContext,
) -> None:
    """Test that reverting a journalled but never applied fault (the agent
    died between journal and apply) succeeds."""
    driver = CpuDriver(context)
    record = await driver.prepare("cpu-4", CpuFault(load_percent=20))

    reverted = await driver.revert(record)

    assert reverted["killed"] == 0
    assert_nothing_left(record)


# The "agent" of the next test: applies a fault, journals the record to a
# file, says so, and waits to be killed.
FAKE_AGENT = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from chaos_agent.faults.base import FaultContext
    from chaos_agent.faults.cpu import CpuDriver
    from chaos_agent.policy import Policy
    from chaos_agent.wire import CpuFault

    async def main() -> None:
        root, journal = sys.argv[1], Path(sys.argv[2])
        context = FaultContext(policy=Policy(), state_dir=journal.parent,
                               cgroup_root=root)
        driver = CpuDriver(context)
        fault = CpuFault(load_percent=30, workers=2)
        record = await driver.prepare("cpu-5", fault)
        await driver.apply("cpu-5", fault, record)
        journal.write_text(json.dumps(record))
        print("applied", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_stressors_die_with_a_killed_agent(
    context: FaultContext, tmp_path: Path
) -> None:
    """Test that SIGKILLing the process that applied a cpu fault kills its
    workers (PR_SET_PDEATHSIG), and that reverting its journalled record
    afterwards succeeds and leaves nothing."""
    journal = tmp_path / "record.json"
    agent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FAKE_AGENT,
        context.cgroup_root,
        str(journal),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert agent.stdout is not None
        # structlog's default output shares stdout; skip to our line.
        while (line := await asyncio.wait_for(agent.stdout.readline(), 30)) != (
            b"applied\n"
        ):
            assert line, "the fake agent exited without applying the fault"
        record = json.loads(journal.read_text())
        assert all(is_alive(pid) for pid in record["pids"])

        os.kill(agent.pid, signal.SIGKILL)
        await agent.wait()
        workers_died = await wait_until_dead(record["pids"])
        await CpuDriver(context).revert(record)
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()

    assert workers_died
    assert_nothing_left(record)


async def test_worker_stops_at_its_own_deadline() -> None:
    """Test that a worker exits by itself at --max-seconds, the safety net for
    a lost agent and journal."""
    argv = stressors.command_line("cpu", "cpu-6", 0.5, "--load-percent", "10")
    worker = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE)
    try:
        assert worker.stdin is not None
        worker.stdin.write(b"g")
        await worker.stdin.drain()

        code = await asyncio.wait_for(worker.wait(), 10)
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()

    assert code == 0


async def test_worker_of_a_dead_parent_does_not_work() -> None:
    """Test that a worker whose parent is not the agent it was started for
    (the agent died before the worker armed PR_SET_PDEATHSIG) exits at once,
    even when its gate byte is already waiting."""
    argv = stressors.command_line(
        "cpu", "cpu-7", 60, "--load-percent", "10", parent_pid=1
    )
    worker = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    try:
        output, _ = await asyncio.wait_for(worker.communicate(b"g"), 10)
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()

    assert worker.returncode == 0
    assert stressors.WORKING_LINE.encode() not in output


async def test_memory_fault_is_resident_and_reverts_clean(
    context: FaultContext,
) -> None:
    """Test that a 64 MiB fault holds its memory resident (read back from the
    worker's mapping and from the cgroup) and that revert removes it."""
    driver = MemoryDriver(context)
    fault = MemoryFault(bytes=64 * MiB)
    driver.check(fault)
    record = await driver.prepare("mem-1", fault)

    detail = await driver.apply("mem-1", fault, record)
    cgroup_usage = FaultCgroup.from_record(record["cgroup"]).memory_usage_bytes()
    await driver.revert(record)

    assert abs(detail["resident_bytes"] - 64 * MiB) <= 6.4 * MiB
    assert cgroup_usage is not None and cgroup_usage >= 64 * MiB * 0.9
    assert cgroup_usage <= detail["limit_bytes"]
    assert_nothing_left(record)


async def test_memory_fault_into_the_reserve_is_rejected_before_any_change(
    context: FaultContext,
) -> None:
    """Test that a memory fault that would eat into the node's reserve is
    refused and creates no cgroup."""
    reserve = psutil.virtual_memory().available - 32 * MiB
    policy = Policy(memory_reserve_bytes=reserve)
    driver = MemoryDriver(
        FaultContext(
            policy=policy, state_dir=context.state_dir, cgroup_root=context.cgroup_root
        )
    )
    layout = detect_layout()
    assert layout is not None

    with pytest.raises(PolicyViolation, match="memory_reserve_bytes"):
        driver.check(MemoryFault(bytes=64 * MiB))

    assert not layout.root_dir("memory", context.cgroup_root).exists()


async def test_memory_fault_beyond_an_ancestor_limit_is_rejected(
    context: FaultContext,
) -> None:
    """Test that a memory fault that would not fit under the limit of a
    cgroup above it (where the agent could be OOM-killed) is refused."""
    layout = detect_layout()
    assert layout is not None
    root_dir = layout.root_dir("memory", context.cgroup_root)
    root_dir.mkdir()
    limit = "memory.max" if layout.version == "v2" else "memory.limit_in_bytes"
    (root_dir / limit).write_text(str(128 * MiB))
    driver = MemoryDriver(context)

    with pytest.raises(FaultRejected, match="memory limit"):
        driver.check(MemoryFault(bytes=64 * MiB))
    driver.check(MemoryFault(bytes=16 * MiB))
