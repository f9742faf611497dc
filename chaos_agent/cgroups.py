"""Cgroups for stressors: one per fault, below the agent, v1 or v2.

The node's layout is read from `/proc/self/mountinfo` and `/proc/self/cgroup`:

- cgroup v1: one hierarchy per controller (or a few controllers mounted
  together, such as `cpu,cpuacct`). A fault cgroup is one directory in each
  hierarchy it needs, `<agent's cgroup>/<root>/<fault id>`.
- cgroup v2: one unified hierarchy whose `cgroup.controllers` lists `cpu` and
  `memory`. A fault cgroup is one directory, `<base>/<root>/<fault id>`, where
  `base` is the agent's cgroup when that is the root, and otherwise the
  agent's parent (see `_v2_base` for why).

Every removal is idempotent: a cgroup that is already gone counts as removed,
and a cgroup that still holds processes is emptied (SIGKILL, bounded wait)
before it is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import structlog

log = structlog.get_logger("chaos_agent.cgroups")

CgroupVersion = Literal["v1", "v2"]

# Controllers the stressors use. cpuacct only exists in v1; there it is how
# the CPU time of a fault cgroup is read back (v2 has it in cpu.stat).
STRESS_CONTROLLERS: Final = ("cpu", "cpuacct", "memory")

# Both the root name and the fault id become directory names.
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

# Long enough for the kernel to tear down a process holding gigabytes of
# anonymous memory, short enough that a stuck revert is reported on time.
DEFAULT_EMPTY_TIMEOUT_S: Final = 10.0

# The CFS period used for quotas. A full second keeps the quota a ceiling on
# the average without fighting a stressor's 100 ms duty cycle inside it.
CFS_PERIOD_US: Final = 1_000_000
# The kernel refuses quotas below 1 ms.
_MIN_CFS_QUOTA_US: Final = 1_000


class CgroupError(Exception):
    """A cgroup operation failed; the text names the path and what to do."""


def check_name(value: str, what: str) -> str:
    """Return `value` if it is safe as one cgroup directory name."""
    if not _NAME_RE.fullmatch(value) or value in {".", ".."}:
        msg = f"{what} {value!r} cannot name a cgroup: use 1-128 of A-Z a-z 0-9 _ . -"
        raise CgroupError(msg)
    return value


# ------------------------------------------------------------------ layout


@dataclass(frozen=True)
class CgroupLayout:
    """Where this node's cgroup controllers live and where the agent sits.

    `mounts` maps each controller to the mount point of its hierarchy (in v2
    every controller maps to the one unified mount); `agent_dirs` maps it to
    the directory of the agent's own cgroup in that hierarchy.
    """

    version: CgroupVersion
    mounts: Mapping[str, Path]
    agent_dirs: Mapping[str, Path]

    @property
    def controllers(self) -> list[str]:
        return sorted(self.mounts)

    def has(self, controller: str) -> bool:
        return controller in self.mounts

    def root_dir(self, controller: str, root_name: str) -> Path:
        """The directory that holds every fault cgroup of `root_name`."""
        check_name(root_name, "cgroup root")
        agent_dir = self.agent_dirs[controller]
        if self.version == "v2":
            return _v2_base(self.mounts[controller], agent_dir) / root_name
        return agent_dir / root_name

    def facts(self) -> dict[str, Any]:
        """What `chaos-agent check` and the status message report."""
        return {
            "cgroup": self.version,
            "controllers": self.controllers,
            "mounts": sorted({str(p) for p in self.mounts.values()}),
        }


@dataclass(frozen=True)
class _Mount:
    root: str
    point: Path
    fstype: str
    options: frozenset[str]


def _read_mounts(mountinfo: str) -> list[_Mount]:
    mounts = []
    for line in mountinfo.splitlines():
        # Fields: id parent dev root point options [optional...] - fstype src super
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] not in {"cgroup", "cgroup2"}:
            continue
        point = Path(_unescape(fields[4]))
        options = frozenset(tail[2].split(","))
        mounts.append(_Mount(_unescape(fields[3]), point, tail[0], options))
    return mounts


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _read_membership(proc_cgroup: str) -> dict[str, str]:
    """Map controller (or "" for the v2 line) to the cgroup path it names."""
    membership = {}
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            membership[""] = path
        for controller in controllers.split(","):
            if controller:
                membership[controller] = path
    return membership


def _dir_in_mount(mount: _Mount, cgroup_path: str) -> Path:
    # A mount may show a subtree of the hierarchy (a container's bind mount):
    # the agent's path is then relative to that subtree's root.
    path, root = Path(cgroup_path), Path(mount.root)
    if path.is_relative_to(root):
        return mount.point / path.relative_to(root)
    return mount.point


def detect_layout(
    pid: int | str = "self", proc: Path = Path("/proc")
) -> CgroupLayout | None:
    """Read the cgroup layout as seen by process `pid`; None without cgroups.

    v2 is chosen when the unified hierarchy holds cpu or memory (on such a node
    v1 cannot hold them too); otherwise the v1 hierarchies of the stressor
    controllers, if any are mounted.
    """
    try:
        mountinfo = (proc / str(pid) / "mountinfo").read_text()
        membership = _read_membership((proc / str(pid) / "cgroup").read_text())
    except OSError:
        return None
    mounts = _read_mounts(mountinfo)

    for mount in mounts:
        if mount.fstype != "cgroup2" or "" not in membership:
            continue
        try:
            available = (mount.point / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        wanted = [c for c in ("cpu", "memory") if c in available]
        if wanted:
            agent_dir = _dir_in_mount(mount, membership[""])
            return CgroupLayout(
                version="v2",
                mounts={c: mount.point for c in wanted},
                agent_dirs={c: agent_dir for c in wanted},
            )

    v1_mounts: dict[str, Path] = {}
    v1_agent_dirs: dict[str, Path] = {}
    for mount in mounts:
        if mount.fstype != "cgroup":
            continue
        for controller in STRESS_CONTROLLERS:
            if controller in mount.options and controller in membership:
                v1_mounts[controller] = mount.point
                v1_agent_dirs[controller] = _dir_in_mount(mount, membership[controller])
    if not v1_mounts:
        return None
    return CgroupLayout(version="v1", mounts=v1_mounts, agent_dirs=v1_agent_dirs)


def controller_availability(
    controller: str, root_name: str
) -> tuple[CgroupLayout | None, str]:
    """The layout if fault cgroups with `controller` can be made under
    `root_name` here, else None and why (with how to get it)."""
    try:
        layout = detect_layout()
        if layout is None or not layout.has(controller):
            reason = (
                f"no cgroup hierarchy with the {controller} controller: mount "
                f"cgroup v2 with {controller} in cgroup.subtree_control, or the "
                f"v1 {controller} hierarchy at /sys/fs/cgroup/{controller}"
            )
            return None, reason
        layout.root_dir(controller, root_name)
    except CgroupError as exc:
        return None, str(exc)
    return layout, ""


def _v2_base(mount_point: Path, agent_dir: Path) -> Path:
    """The v2 directory under which the agent creates its `<root>` cgroup.

    v2 lets a cgroup hand cpu and memory to its children only while it holds
    no processes itself (the root cgroup is exempt). The agent's own cgroup
    holds the agent, so unless it is the root, fault cgroups go beside it,
    under its parent: the service slice or pod the agent was placed in, which
    is as close to "below the agent" as v2 allows without moving the agent.
    """
    is_true_root = not (agent_dir / "cgroup.type").exists()
    if is_true_root:
        return agent_dir
    if agent_dir == mount_point:
        # Known shortcoming: inside a private cgroup namespace the agent's own
        # cgroup is the top of what it can see and it holds the agent, so
        # there is no place for stressor cgroups. Moving the agent into a leaf
        # (`<ns root>/agent`) at start would open one; that is not done yet.
        msg = (
            f"the agent's cgroup {agent_dir} is the root of its cgroup namespace "
            "and holds processes, so cgroup v2 allows no stressor cgroups below "
            "it; run the agent in the host cgroup namespace or in a leaf cgroup "
            "of a delegated subtree"
        )
        raise CgroupError(msg)
    return agent_dir.parent


# ------------------------------------------------------------- file access


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        msg = f"cannot write {value!r} to {path}: {exc.strerror or exc}"
        raise CgroupError(msg) from exc


def _read_pids(cgroup_dir: Path) -> set[int]:
    try:
        text = (cgroup_dir / "cgroup.procs").read_text()
    except FileNotFoundError:
        return set()
    except OSError as exc:
        if exc.errno == errno.ENODEV:  # removed while we read it
            return set()
        raise
    return {int(line) for line in text.split()}


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        msg = f"cannot create cgroup {path}: {exc.strerror or exc}"
        raise CgroupError(msg) from exc


def _rmdir(path: Path) -> bool:
    """Remove one cgroup directory; False if it still holds processes."""
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        msg = f"cannot remove cgroup {path}: {exc.strerror or exc}"
        raise CgroupError(msg) from exc
    return True


def _enable_v2_controllers(directory: Path, controllers: Iterable[str]) -> None:
    """Let the children of `directory` use `controllers` (v2 only)."""
    try:
        enabled = (directory / "cgroup.subtree_control").read_text().split()
    except OSError as exc:
        msg = f"cannot read {directory}/cgroup.subtree_control: {exc}"
        raise CgroupError(msg) from exc
    missing = [c for c in controllers if c not in enabled]
    if missing:
        change = " ".join(f"+{c}" for c in missing)
        _write(directory / "cgroup.subtree_control", change)


# ------------------------------------------------------------ fault cgroup


@dataclass(frozen=True)
class FaultCgroup:
    """The cgroup (one directory per v1 hierarchy, one in v2) of one fault."""

    version: CgroupVersion
    fault_id: str
    # controller -> directory; v1 controllers mounted together share one.
    dirs: Mapping[str, Path]

    @classmethod
    def for_fault(
        cls,
        layout: CgroupLayout,
        root_name: str,
        fault_id: str,
        controllers: Iterable[str],
    ) -> FaultCgroup:
        """Describe (not create) the cgroup of `fault_id` for `controllers`;
        those the node lacks are skipped (cpuacct, say, on a v2 node)."""
        check_name(fault_id, "fault id")
        dirs = {
            c: layout.root_dir(c, root_name) / fault_id
            for c in controllers
            if layout.has(c)
        }
        if not dirs:
            wanted = ", ".join(controllers)
            msg = f"this node has none of the cgroup controllers {wanted} mounted"
            raise CgroupError(msg)
        return cls(layout.version, fault_id, dirs)

    # The journal keeps the directories themselves, so revert finds the same
    # cgroups even if the agent's own cgroup has moved since.
    def to_record(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "fault_id": self.fault_id,
            "dirs": {c: str(p) for c, p in self.dirs.items()},
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> FaultCgroup:
        """Rebuild from a journal record, refusing paths that are not fault
        cgroups: a damaged journal must not make revert kill strangers."""
        fault_id = check_name(str(record["fault_id"]), "fault id")
        version = record["version"]
        if version not in ("v1", "v2"):
            msg = f"cgroup version {version!r} in the record is neither v1 nor v2"
            raise CgroupError(msg)
        dirs = {str(c): Path(p) for c, p in dict(record["dirs"]).items()}
        for path in dirs.values():
            if path.name != fault_id or not _looks_like_cgroup_path(path):
                msg = f"{path} in the record is not the cgroup of fault {fault_id}"
                raise CgroupError(msg)
        return cls(version, fault_id, dirs)

    @property
    def unique_dirs(self) -> list[Path]:
        return sorted(set(self.dirs.values()))

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.unique_dirs)

    def create(self) -> None:
        """Create the cgroup (and its `<root>` parent); existing is fine."""
        for directory in self.unique_dirs:
            if self.version == "v2":
                # The root's parent must pass the controllers down to the
                # root, and the root to the fault cgroup.
                _enable_v2_controllers(directory.parent.parent, self.dirs)
                _mkdir(directory.parent)
                _enable_v2_controllers(directory.parent, self.dirs)
            else:
                _mkdir(directory.parent)
            _mkdir(directory)

    def set_cpu_quota(self, cores: float) -> int:
        """Cap the cgroup at `cores` CPUs on average; returns the quota in
        microseconds per `CFS_PERIOD_US`."""
        quota_us = max(_MIN_CFS_QUOTA_US, round(cores * CFS_PERIOD_US))
        cpu_dir = self._dir("cpu")
        if self.version == "v2":
            _write(cpu_dir / "cpu.max", f"{quota_us} {CFS_PERIOD_US}")
        else:
            _write(cpu_dir / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(cpu_dir / "cpu.cfs_quota_us", str(quota_us))
        return quota_us

    def set_memory_limit(self, limit_bytes: int) -> None:
        """Limit the cgroup's memory and keep it out of swap, so an overrun
        meets the OOM killer inside this cgroup and nowhere else."""
        memory_dir = self._dir("memory")
        if self.version == "v2":
            _write(memory_dir / "memory.max", str(limit_bytes))
            _write_if_present(memory_dir / "memory.swap.max", "0")
            # An OOM kill takes every stressor of the fault, not one of them.
            _write_if_present(memory_dir / "memory.oom.group", "1")
        else:
            _write(memory_dir / "memory.limit_in_bytes", str(limit_bytes))
            _write_if_present(memory_dir / "memory.swappiness", "0")

    def add_pid(self, pid: int) -> None:
        """Move process `pid` into the cgroup (every hierarchy of it)."""
        for directory in self.unique_dirs:
            _write(directory / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        """Processes in the cgroup, in any of its hierarchies."""
        found: set[int] = set()
        for directory in self.unique_dirs:
            found |= _read_pids(directory)
        return found

    def cpu_usage_ns(self) -> int | None:
        """CPU time used by the cgroup so far, or None if it cannot be read."""
        try:
            if self.version == "v2":
                stat = (self._dir("cpu") / "cpu.stat").read_text()
                usage_us = _stat_field(stat, "usage_usec")
                return None if usage_us is None else usage_us * 1000
            return int((self._dir("cpuacct") / "cpuacct.usage").read_text())
        except (OSError, KeyError, ValueError):
            return None

    def memory_usage_bytes(self) -> int | None:
        """Memory charged to the cgroup, or None if it cannot be read."""
        name = "memory.current" if self.version == "v2" else "memory.usage_in_bytes"
        try:
            return int((self._dir("memory") / name).read_text())
        except (OSError, KeyError, ValueError):
            return None

    def kill(self, timeout_s: float = DEFAULT_EMPTY_TIMEOUT_S) -> int:
        """SIGKILL every process in the cgroup and wait until it is empty.

        Returns how many processes were signalled. Raises CgroupError if the
        cgroup is not empty after `timeout_s` (a process stuck in the kernel).
        """
        killed: set[int] = set()
        deadline = time.monotonic() + timeout_s
        for directory in self.unique_dirs:
            # cgroup.kill (v2, Linux 5.14+) also catches processes that fork
            # while we signal; the loop below covers everything else.
            if self.version == "v2" and (directory / "cgroup.kill").exists():
                _write_if_present(directory / "cgroup.kill", "1")
        while pids := self.pids():
            for pid in pids - killed:
                _signal(pid, signal.SIGKILL)
                killed.add(pid)
            if time.monotonic() > deadline:
                msg = (
                    f"cgroup of fault {self.fault_id} still holds pids "
                    f"{sorted(pids)} {timeout_s:g}s after SIGKILL; they are "
                    "probably stuck in the kernel (see /proc/<pid>/stack)"
                )
                raise CgroupError(msg)
            time.sleep(0.01)
        return len(killed)

    def remove(self, timeout_s: float = DEFAULT_EMPTY_TIMEOUT_S) -> int:
        """Kill what is inside and remove the cgroup. Idempotent: a cgroup
        that is already gone is removed. Returns how many were killed."""
        killed = self.kill(timeout_s)
        deadline = time.monotonic() + timeout_s
        for directory in self.unique_dirs:
            # A killed process can linger in the cgroup for a moment after it
            # left cgroup.procs, so rmdir may briefly answer EBUSY.
            while not _rmdir(directory):
                if time.monotonic() > deadline:
                    msg = f"cgroup {directory} stays busy; see its cgroup.procs"
                    raise CgroupError(msg)
                killed += self.kill(timeout_s)
                time.sleep(0.01)
        return killed

    def _dir(self, controller: str) -> Path:
        try:
            return self.dirs[controller]
        except KeyError:
            msg = f"the cgroup of fault {self.fault_id} has no {controller} controller"
            raise CgroupError(msg) from None


def _write_if_present(path: Path, value: str) -> None:
    # Optional knobs (swap limits without swap accounting, cgroup.kill on old
    # kernels): their absence changes nothing about safety.
    try:
        path.write_text(value)
    except OSError as exc:
        log.debug("cgroup_knob_skipped", path=str(path), error=str(exc))


def _stat_field(stat: str, name: str) -> int | None:
    for line in stat.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value)
    return None


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _looks_like_cgroup_path(path: Path) -> bool:
    # Fault cgroups always live on a cgroup file system; /sys/fs/cgroup is
    # where every distribution and container runtime mounts them.
    return (
        path.is_absolute()
        and ".." not in path.parts
        and (path.is_relative_to("/sys/fs/cgroup") or _on_cgroup_mount(path))
    )


def _on_cgroup_mount(path: Path) -> bool:
    try:
        mounts = _read_mounts(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return False
    return any(path.is_relative_to(m.point) for m in mounts)


def memory_headroom_bytes(layout: CgroupLayout, root_name: str) -> int | None:
    """Memory that fault cgroups of `root_name` can still take before some
    ancestor cgroup (the agent's, its pod's) reaches its own limit; None when
    no ancestor has one.

    A stressor that filled an ancestor's limit would meet the OOM killer
    there, where the agent itself is a candidate.
    """
    if not layout.has("memory"):
        return None
    mount = layout.mounts["memory"]
    directory = layout.root_dir("memory", root_name)
    if layout.version == "v2":
        limit_name, usage_name = "memory.max", "memory.current"
    else:
        limit_name, usage_name = "memory.limit_in_bytes", "memory.usage_in_bytes"

    headroom: int | None = None
    for ancestor in [directory, *directory.parents]:
        if not ancestor.is_relative_to(mount):
            break
        try:
            limit_text = (ancestor / limit_name).read_text().strip()
            usage = int((ancestor / usage_name).read_text())
        except (OSError, ValueError):
            continue  # not created yet, or the root, which has no limit
        if limit_text == "max" or int(limit_text) >= _V1_UNLIMITED:
            continue
        room = max(0, int(limit_text) - usage)
        headroom = room if headroom is None else min(headroom, room)
    return headroom


# v1 reports "no limit" as the largest page-aligned signed 64-bit number.
_V1_UNLIMITED: Final = 2**62


# ----------------------------------------------------------- housekeeping


def leftover_fault_ids(layout: CgroupLayout, root_name: str) -> list[str]:
    """Fault ids that still have a cgroup under `root_name` (for reconcile)."""
    found: set[str] = set()
    for controller in layout.mounts:
        root_dir = layout.root_dir(controller, root_name)
        try:
            found |= {p.name for p in root_dir.iterdir() if p.is_dir()}
        except FileNotFoundError:
            continue
    return sorted(found)


def remove_root_if_unused(root_name: str) -> bool:
    """Remove the parent of the fault cgroups if it holds none; for an
    agent's exit, so a node without faults keeps no trace of the agent.

    A parent that still holds a fault cgroup (another agent's, on a lab
    machine that runs several) stays. Returns whether it is gone.

    Known race, lab machines only: if another agent on the same node creates
    its first fault cgroup in the microseconds between making the parent and
    the child, this can remove the parent under it; that apply then fails
    (ENOENT) and is reported as failed, never left half-applied.
    """
    layout = detect_layout()
    if layout is None:
        return True
    gone = True
    for controller in layout.mounts:
        try:
            gone = _rmdir(layout.root_dir(controller, root_name)) and gone
        except CgroupError:
            gone = False
    return gone


def remove_all(
    root_name: str,
    layout: CgroupLayout | None = None,
    timeout_s: float = DEFAULT_EMPTY_TIMEOUT_S,
) -> list[str]:
    """Kill and remove every fault cgroup under `root_name`, then the root
    itself. Returns the fault ids that were removed.

    For the agent's reconcile at start and for test cleanup. Safe to call
    when nothing is there.
    """
    layout = layout if layout is not None else detect_layout()
    if layout is None:
        return []
    removed = []
    for fault_id in leftover_fault_ids(layout, root_name):
        cgroup = FaultCgroup.for_fault(layout, root_name, fault_id, layout.mounts)
        killed = cgroup.remove(timeout_s)
        log.warning("leftover_cgroup_removed", fault_id=fault_id, killed=killed)
        removed.append(fault_id)
    for root_dir in {layout.root_dir(c, root_name) for c in layout.mounts}:
        # Another fault may be created under the same root meanwhile; then it
        # stays, which is what its owner wants.
        _rmdir(root_dir)
    return removed
