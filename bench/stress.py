"""CPU and memory stressors: achieved versus asked, next to stress-ng.

CPU: for 25/50/80 % of one core, the cpu fault (one worker) and
`stress-ng --cpu 1 --cpu-load N`, each in a cgroup of its own and measured
the same way, from that cgroup's CPU time counter (median of 3 runs of 5 s).
Memory: resident bytes of the memory fault versus the asked size.

Needs root (cgroups). Other load on the machine shows up in the figures, so
the load average is printed with them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

from chaos_agent.cgroups import FaultCgroup, detect_layout, remove_all
from chaos_agent.faults.base import FaultContext
from chaos_agent.faults.cpu import CpuDriver
from chaos_agent.faults.memory import MemoryDriver
from chaos_agent.policy import Policy
from chaos_agent.wire import CpuFault, MemoryFault

TARGETS = (25, 50, 80)
RUNS = 3
WARMUP_S = 1.0
MEASURE_S = 5.0
MEMORY_SIZES_MIB = (64, 256)
MiB = 1024 * 1024

# stress-ng is started through this gate, like our workers: it execs only
# once it is inside its cgroup, so its forked workers are born there too.
_GATED_EXEC = "import os, sys; sys.stdin.read(1); os.execvp(sys.argv[1], sys.argv[1:])"


async def load_of(cgroup: FaultCgroup) -> float:
    """Percent of one core the cgroup uses over MEASURE_S, after a warm-up."""
    await asyncio.sleep(WARMUP_S)
    before, started = cgroup.cpu_usage_ns(), time.monotonic()
    await asyncio.sleep(MEASURE_S)
    after, elapsed = cgroup.cpu_usage_ns(), time.monotonic() - started
    assert before is not None and after is not None
    return (after - before) / 1e9 / elapsed * 100


async def ours(context: FaultContext, target: int, run: int) -> tuple[float, float]:
    """Achieved load and apply time (ms) of one cpu fault run."""
    driver = CpuDriver(context)
    fault = CpuFault(load_percent=target, workers=1)
    fault_id = f"bench-cpu-{target}-{run}"
    record = await driver.prepare(fault_id, fault)
    started = time.monotonic()
    try:
        await driver.apply(fault_id, fault, record)
        apply_ms = (time.monotonic() - started) * 1000
        load = await load_of(FaultCgroup.from_record(record["cgroup"]))
    finally:
        await driver.revert(record)
    return load, apply_ms


async def stress_ng(root: str, target: int, run: int) -> float:
    """Achieved load of `stress-ng --cpu 1 --cpu-load target` in a cgroup."""
    layout = detect_layout()
    assert layout is not None
    cgroup = FaultCgroup.for_fault(
        layout, root, f"bench-ng-{target}-{run}", ["cpu", "cpuacct"]
    )
    cgroup.create()
    seconds = int(WARMUP_S + MEASURE_S + 5)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _GATED_EXEC,
        "stress-ng",
        "--cpu",
        "1",
        "--cpu-load",
        str(target),
        "--timeout",
        f"{seconds}s",
        "--quiet",
        stdin=asyncio.subprocess.PIPE,
    )
    try:
        cgroup.add_pid(process.pid)
        assert process.stdin is not None
        process.stdin.write(b"g")
        process.stdin.close()
        return await load_of(cgroup)
    finally:
        await asyncio.to_thread(cgroup.remove)
        await process.wait()


async def cpu_table(context: FaultContext) -> None:
    have_stress_ng = shutil.which("stress-ng") is not None
    print(f"cpu: 1 worker, median of {RUNS} runs of {MEASURE_S:g} s (cgroup CPU time)")
    print(f"{'target %':>9} {'ours %':>8} {'stress-ng %':>12} {'apply ms':>9}")
    for target in TARGETS:
        results = [await ours(context, target, run) for run in range(RUNS)]
        loads, apply_ms = zip(*results, strict=True)
        if have_stress_ng:
            ng = [await stress_ng(context.cgroup_root, target, r) for r in range(RUNS)]
            ng_text = f"{statistics.median(ng):12.1f}"
        else:
            ng_text = f"{'(missing)':>12}"
        print(
            f"{target:9d} {statistics.median(loads):8.1f} {ng_text} "
            f"{statistics.median(apply_ms):9.1f}"
        )


async def memory_table(context: FaultContext) -> None:
    print("memory: resident bytes of the worker's mapping and cgroup usage")
    print(f"{'asked MiB':>10} {'resident MiB':>13} {'cgroup MiB':>11} {'apply ms':>9}")
    driver = MemoryDriver(context)
    for size_mib in MEMORY_SIZES_MIB:
        fault = MemoryFault(bytes=size_mib * MiB)
        fault_id = f"bench-mem-{size_mib}"
        record = await driver.prepare(fault_id, fault)
        started = time.monotonic()
        try:
            detail = await driver.apply(fault_id, fault, record)
            apply_ms = (time.monotonic() - started) * 1000
        finally:
            await driver.revert(record)
        print(
            f"{size_mib:10d} {detail['resident_bytes'] / MiB:13.1f} "
            f"{detail['cgroup_usage_bytes'] / MiB:11.1f} {apply_ms:9.1f}"
        )


async def run() -> None:
    root = f"aftershock-bench-{uuid.uuid4().hex[:8]}"
    context = FaultContext(policy=Policy(), state_dir=Path("/tmp"), cgroup_root=root)
    try:
        print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        await cpu_table(context)
        await memory_table(context)
        print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    finally:
        remove_all(root)


def main() -> None:
    layout = detect_layout()
    if os.geteuid() != 0 or layout is None or not layout.has("cpu"):
        print("skipped: needs root and cgroup cpu and memory controllers")
        return
    asyncio.run(run())


if __name__ == "__main__":
    main()
