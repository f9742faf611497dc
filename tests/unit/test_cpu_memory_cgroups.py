"""Unit tests of the cgroup layout reader and the v2 file protocol.

The layouts are written as /proc files and cgroup directories under
tmp_path, so these tests need no privileges; the real kernel is exercised in
tests/integration/test_cgroups.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos_agent.cgroups import (
    CFS_PERIOD_US,
    CgroupError,
    CgroupLayout,
    FaultCgroup,
    detect_layout,
    leftover_fault_ids,
)

# Debian 12 style hybrid host: v1 controllers, an empty cgroup2 mount.
HYBRID_MOUNTINFO = """\
25 20 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / {root}/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
27 25 0:24 / {root}/cpu rw,relatime shared:10 - cgroup cgroup rw,cpu
28 25 0:25 / {root}/cpuacct rw,relatime shared:11 - cgroup cgroup rw,cpuacct
29 25 0:26 / {root}/memory rw,relatime shared:12 - cgroup cgroup rw,memory
30 25 0:27 / {root}/systemd rw,relatime - cgroup cgroup rw,name=systemd
"""
HYBRID_CGROUP = """\
9:name=systemd:/
4:memory:/agents/a1
2:cpuacct:/
1:cpu:/
0::/
"""

COMOUNTED_MOUNTINFO = """\
27 25 0:24 / {root}/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
29 25 0:26 /kubepods/pod1 {root}/memory rw,relatime - cgroup cgroup rw,memory
"""
COMOUNTED_CGROUP = """\
3:cpu,cpuacct:/system.slice/agent.service
2:memory:/kubepods/pod1/agent
"""

V2_MOUNTINFO = "26 25 0:23 / {root} rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"


def fake_proc(tmp_path: Path, mountinfo: str, proc_cgroup: str) -> Path:
    """Write /proc/self/{mountinfo,cgroup} for a fake node; return /proc."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    cgroup_root = tmp_path / "cgroup"
    (proc / "self" / "mountinfo").write_text(mountinfo.format(root=cgroup_root))
    (proc / "self" / "cgroup").write_text(proc_cgroup)
    return proc


def fake_v2_node(tmp_path: Path, agent_cgroup: str) -> CgroupLayout:
    """A pure v2 node with the agent in `agent_cgroup`."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    agent_dir = root / agent_cgroup.strip("/")
    for directory in [agent_dir, *agent_dir.parents]:
        if directory == root:
            break
        directory.mkdir(parents=True, exist_ok=True)
        # Non-root v2 cgroups have cgroup.type; the root has not.
        (directory / "cgroup.type").write_text("domain\n")
        (directory / "cgroup.subtree_control").write_text("")
    proc = fake_proc(tmp_path, V2_MOUNTINFO, f"0::{agent_cgroup}\n")
    layout = detect_layout(proc=proc)
    assert layout is not None
    return layout


def test_hybrid_node_uses_v1_hierarchies(tmp_path: Path) -> None:
    """Test that a node whose cgroup2 mount has no controllers is read as v1,
    with the agent's cgroup found per hierarchy."""
    proc = fake_proc(tmp_path, HYBRID_MOUNTINFO, HYBRID_CGROUP)

    layout = detect_layout(proc=proc)

    assert layout is not None
    assert layout.version == "v1"
    assert layout.controllers == ["cpu", "cpuacct", "memory"]
    root = tmp_path / "cgroup"
    assert layout.agent_dirs["memory"] == root / "memory/agents/a1"
    assert layout.root_dir("cpu", "aftershock") == root / "cpu/aftershock"
    assert layout.root_dir("memory", "aftershock") == (
        root / "memory/agents/a1/aftershock"
    )


def test_comounted_hierarchies_share_one_directory(tmp_path: Path) -> None:
    """Test that cpu and cpuacct mounted together give one fault directory,
    and that a mount of a subtree maps the agent's path into it."""
    proc = fake_proc(tmp_path, COMOUNTED_MOUNTINFO, COMOUNTED_CGROUP)
    layout = detect_layout(proc=proc)
    assert layout is not None

    cgroup = FaultCgroup.for_fault(layout, "aftershock", "f1", layout.mounts)

    root = tmp_path / "cgroup"
    cpu_dir = root / "cpu,cpuacct/system.slice/agent.service/aftershock/f1"
    assert cgroup.dirs["cpu"] == cgroup.dirs["cpuacct"] == cpu_dir
    assert cgroup.dirs["memory"] == root / "memory/agent/aftershock/f1"
    assert len(cgroup.unique_dirs) == 2


def test_no_cgroup_mounts_means_no_layout(tmp_path: Path) -> None:
    """Test that a node without cgroup mounts has no layout."""
    proc = fake_proc(tmp_path, "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n", "0::/\n")

    assert detect_layout(proc=proc) is None


def test_v2_agent_in_root_puts_faults_below_it(tmp_path: Path) -> None:
    """Test that an agent in the v2 root cgroup creates its root below it."""
    layout = fake_v2_node(tmp_path, "/")

    assert layout.version == "v2"
    assert layout.controllers == ["cpu", "memory"]
    assert layout.root_dir("cpu", "aftershock") == tmp_path / "cgroup/aftershock"


def test_v2_agent_in_a_leaf_puts_faults_beside_it(tmp_path: Path) -> None:
    """Test that an agent in a non-root v2 cgroup (which holds the agent and
    so cannot hand controllers down) creates its root under its parent."""
    layout = fake_v2_node(tmp_path, "/system.slice/agent.service")

    expected = tmp_path / "cgroup/system.slice/aftershock"
    assert layout.root_dir("memory", "aftershock") == expected


def test_v2_cgroup_files_are_written_as_the_kernel_expects(tmp_path: Path) -> None:
    """Test that a v2 fault cgroup enables its controllers on the way down and
    writes cpu.max, memory.max and cgroup.procs in v2 syntax."""
    layout = fake_v2_node(tmp_path, "/")
    cgroup = FaultCgroup.for_fault(layout, "aftershock", "f1", ["cpu", "memory"])
    # What the kernel would put into a new cgroup directory.
    (tmp_path / "cgroup/aftershock").mkdir()
    (tmp_path / "cgroup/aftershock/cgroup.subtree_control").write_text("")

    cgroup.create()
    quota_us = cgroup.set_cpu_quota(1.5)
    cgroup.set_memory_limit(64 * 1024 * 1024)
    cgroup.add_pid(4242)

    root = tmp_path / "cgroup"
    fault_dir = root / "aftershock/f1"
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert (root / "aftershock/cgroup.subtree_control").read_text() == "+cpu +memory"
    assert quota_us == 1_500_000
    assert (fault_dir / "cpu.max").read_text() == f"1500000 {CFS_PERIOD_US}"
    assert (fault_dir / "memory.max").read_text() == str(64 * 1024 * 1024)
    assert (fault_dir / "memory.swap.max").read_text() == "0"
    assert (fault_dir / "cgroup.procs").read_text() == "4242"
    assert leftover_fault_ids(layout, "aftershock") == ["f1"]


def test_record_round_trip() -> None:
    """Test that a fault cgroup rebuilt from its journal record is the same."""
    root = Path("/sys/fs/cgroup")
    dirs = {
        "cpu": root / "cpu,cpuacct/aftershock/f1",
        "cpuacct": root / "cpu,cpuacct/aftershock/f1",
        "memory": root / "memory/agent/aftershock/f1",
    }
    cgroup = FaultCgroup("v1", "f1", dirs)

    assert FaultCgroup.from_record(cgroup.to_record()) == cgroup


@pytest.mark.parametrize(
    "dirs",
    [
        {"cpu": "/sys/fs/cgroup/cpu/aftershock/other-fault"},
        {"cpu": "/sys/fs/cgroup/cpu/../../../home/f1"},
        {"cpu": "/home/user/f1"},
        {"cpu": "relative/f1"},
    ],
)
def test_record_with_foreign_path_is_refused(dirs: dict[str, str]) -> None:
    """Test that a damaged journal record naming a directory that is not this
    fault's cgroup is refused, so revert never kills strangers."""
    record = {"version": "v1", "fault_id": "f1", "dirs": dirs}

    with pytest.raises(CgroupError):
        FaultCgroup.from_record(record)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "x" * 129, "a b"])
def test_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    """Test that a fault id that is not one plain directory name is refused."""
    proc = fake_proc(tmp_path, HYBRID_MOUNTINFO, HYBRID_CGROUP)
    layout = detect_layout(proc=proc)
    assert layout is not None

    with pytest.raises(CgroupError, match="cannot name a cgroup"):
        FaultCgroup.for_fault(layout, "aftershock", name, ["cpu"])


def test_v2_private_namespace_root_has_no_place_for_faults(tmp_path: Path) -> None:
    """Test that an agent at the root of a private cgroup v2 namespace (a
    non-root cgroup that holds the agent) gets a clear error, not a cgroup
    that v2 would refuse to populate."""
    layout = fake_v2_node(tmp_path, "/")
    (tmp_path / "cgroup/cgroup.type").write_text("domain\n")

    with pytest.raises(CgroupError, match="cgroup namespace"):
        layout.root_dir("cpu", "aftershock")
