"""Unit tests of the cpu and memory drivers' checks and the stressor argv.

check() has no side effects, so these need no privileges: they read
/proc/meminfo and the CPU affinity of this process, nothing else.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from chaos_agent import stressors
from chaos_agent.faults.base import FaultContext, FaultRejected
from chaos_agent.faults.cpu import MAX_WORKERS_PER_CPU, CpuDriver, node_cpus
from chaos_agent.faults.memory import MemoryDriver, memory_limit_bytes
from chaos_agent.policy import Policy, PolicyViolation
from chaos_agent.wire import CpuFault, MemoryFault

MiB = 1024 * 1024


def context(tmp_path: Path, **policy: object) -> FaultContext:
    return FaultContext(
        policy=Policy.model_validate(policy),
        state_dir=tmp_path,
        cgroup_root="aftershock-unit",
    )


def test_cpu_load_above_policy_is_a_violation(tmp_path: Path) -> None:
    """Test that a load above max_cpu_load_percent is refused, naming the cap."""
    driver = CpuDriver(context(tmp_path, max_cpu_load_percent=40))

    with pytest.raises(PolicyViolation, match="max_cpu_load_percent"):
        driver.check(CpuFault(load_percent=50))


def test_cpu_too_many_workers_is_rejected(tmp_path: Path) -> None:
    """Test that more workers than the per-CPU cap is refused."""
    driver = CpuDriver(context(tmp_path))
    workers = MAX_WORKERS_PER_CPU * node_cpus() + 1

    with pytest.raises(FaultRejected, match="per CPU"):
        driver.check(CpuFault(load_percent=10, workers=workers))


def test_cpu_workers_default_to_every_cpu() -> None:
    """Test that a cpu fault without workers gets one per CPU."""
    assert CpuDriver.workers(CpuFault(load_percent=10)) == node_cpus()
    assert CpuDriver.workers(CpuFault(load_percent=10, workers=3)) == 3


def test_memory_above_policy_share_is_a_violation(tmp_path: Path) -> None:
    """Test that more than max_memory_percent of the node is refused."""
    driver = MemoryDriver(context(tmp_path, max_memory_percent=1))

    with pytest.raises(PolicyViolation, match="max_memory_percent"):
        driver.check(MemoryFault(percent=2))


def test_memory_into_the_reserve_is_a_violation(tmp_path: Path) -> None:
    """Test that a size leaving less than memory_reserve_bytes available is
    refused, naming the reserve."""
    available = psutil.virtual_memory().available
    driver = MemoryDriver(context(tmp_path, memory_reserve_bytes=available))

    with pytest.raises(PolicyViolation, match="memory_reserve_bytes"):
        driver.check(MemoryFault(bytes=64 * MiB))


def test_memory_percent_is_of_total(tmp_path: Path) -> None:
    """Test that percent sizes are taken of the node's total memory."""
    driver = MemoryDriver(context(tmp_path))
    total = psutil.virtual_memory().total

    assert driver.size_bytes(MemoryFault(percent=10)) == int(total * 0.1)
    assert driver.size_bytes(MemoryFault(bytes=12345)) == 12345


def test_memory_limit_is_slightly_above_the_asked_size() -> None:
    """Test that the cgroup limit leaves room for the worker, and not much
    more."""
    for size in (64 * MiB, 4096 * MiB):
        limit = memory_limit_bytes(size)
        assert size < limit <= size * 1.01 + 32 * MiB


def test_stressor_command_line_parses_and_identifies_its_fault() -> None:
    """Test that the argv built for a worker is what the worker parses, and
    that it names its fault so that revert can recognise it."""
    argv = stressors.command_line("cpu", "f-1", 90, "--load-percent", "50")

    args = stressors._parser().parse_args(argv[3:])

    assert (args.kind, args.fault_id, args.load_percent) == ("cpu", "f-1", 50.0)
    assert args.max_seconds == 90
    assert stressors.is_stressor_of(argv, "f-1")
    assert not stressors.is_stressor_of(argv, "f-2")
    assert not stressors.is_stressor_of(["sleep", "--fault-id", "f-1"], "f-1")
