"""Fault cgroups on the real kernel: create, limit, kill, remove.

Needs root. Every test works under its own cgroup root name and removes it
whatever happens.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest

from chaos_agent.cgroups import (
    CgroupLayout,
    FaultCgroup,
    detect_layout,
    leftover_fault_ids,
    remove_all,
    remove_root_if_unused,
)

pytestmark = [pytest.mark.integration, pytest.mark.root]

MiB = 1024 * 1024
BUSY_LOOP = "while True: pass"


@pytest.fixture
def layout() -> CgroupLayout:
    found = detect_layout()
    if found is None or not (found.has("cpu") and found.has("memory")):
        pytest.skip("this node has no cgroup cpu and memory controllers")
    return found


@pytest.fixture
def root_name(layout: CgroupLayout) -> Iterator[str]:
    """A cgroup root of this test's own, removed with all it holds."""
    name = f"aftershock-test-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        remove_all(name, layout)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; killed (by pid) and reaped at the end."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            process.kill()
            process.wait()


def spawn(processes: list[subprocess.Popen[bytes]], code: str) -> int:
    process = subprocess.Popen([sys.executable, "-c", code])
    processes.append(process)
    return process.pid


def is_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_layout_of_this_node(layout: CgroupLayout) -> None:
    """Test that the layout names existing hierarchies and agent cgroups."""
    for controller in ("cpu", "memory"):
        assert layout.mounts[controller].is_dir()
        assert (layout.agent_dirs[controller] / "cgroup.procs").is_file()


def test_remove_kills_processes_and_is_idempotent(
    layout: CgroupLayout,
    root_name: str,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """Test that removing a fault cgroup kills what it holds, removes every
    directory, and succeeds again when it is already gone."""
    cgroup = FaultCgroup.for_fault(layout, root_name, "f1", ["cpu", "memory"])
    cgroup.create()
    pid = spawn(processes, "import time; time.sleep(60)")
    cgroup.add_pid(pid)
    assert cgroup.pids() == {pid}

    killed = cgroup.remove()

    assert killed == 1
    assert not is_alive(pid)
    assert not cgroup.exists()
    assert cgroup.remove() == 0


def test_cpu_quota_caps_a_busy_process(
    layout: CgroupLayout,
    root_name: str,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """Test that the CPU quota holds a process that would take a whole core
    to the asked share."""
    cgroup = FaultCgroup.for_fault(layout, root_name, "f1", ["cpu", "cpuacct"])
    cgroup.create()
    cgroup.set_cpu_quota(0.2)
    cgroup.add_pid(spawn(processes, BUSY_LOOP))
    time.sleep(1.0)

    before, started = cgroup.cpu_usage_ns(), time.monotonic()
    time.sleep(3.0)
    after, elapsed = cgroup.cpu_usage_ns(), time.monotonic() - started

    assert before is not None and after is not None
    cores = (after - before) / 1e9 / elapsed
    assert 0.05 < cores < 0.3


def test_memory_limit_oom_kills_inside_the_cgroup_only(
    layout: CgroupLayout,
    root_name: str,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """Test that a process that outgrows the memory limit is OOM-killed while
    the rest of the node (this test) carries on."""
    cgroup = FaultCgroup.for_fault(layout, root_name, "f1", ["memory"])
    cgroup.create()
    cgroup.set_memory_limit(64 * MiB)
    # Paused on stdin until it is inside the cgroup, like a stressor.
    hog = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; sys.stdin.read(1); x = bytearray(256 * 1024 * 1024)",
        ],
        stdin=subprocess.PIPE,
    )
    processes.append(hog)
    cgroup.add_pid(hog.pid)
    assert hog.stdin is not None
    hog.stdin.write(b"g")
    hog.stdin.close()

    assert hog.wait(timeout=30) == -9


def test_remove_all_clears_every_leftover(
    layout: CgroupLayout,
    root_name: str,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """Test that remove_all kills and removes every fault cgroup under a root
    (what a crashed agent leaves behind) and the root itself."""
    pids = []
    for fault_id in ("f1", "f2"):
        cgroup = FaultCgroup.for_fault(layout, root_name, fault_id, layout.mounts)
        cgroup.create()
        pids.append(spawn(processes, "import time; time.sleep(60)"))
        cgroup.add_pid(pids[-1])
    assert leftover_fault_ids(layout, root_name) == ["f1", "f2"]

    removed = remove_all(root_name, layout)

    assert removed == ["f1", "f2"]
    assert leftover_fault_ids(layout, root_name) == []
    assert not any(is_alive(pid) for pid in pids)
    for controller in layout.mounts:
        assert not layout.root_dir(controller, root_name).exists()


def test_root_is_removed_on_exit_only_when_it_holds_no_fault(
    layout: CgroupLayout, root_name: str
) -> None:
    """Test that the agent's exit clean-up keeps a parent that still holds a
    fault cgroup, and removes it once that fault is gone."""
    cgroup = FaultCgroup.for_fault(layout, root_name, "f1", ["cpu", "memory"])
    cgroup.create()
    roots = {layout.root_dir(c, root_name) for c in ("cpu", "memory")}

    assert remove_root_if_unused(root_name) is False
    assert all(root.is_dir() for root in roots)

    cgroup.remove()
    assert remove_root_if_unused(root_name) is True
    assert not any(root.exists() for root in roots)
