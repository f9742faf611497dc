"""What this node can do: cgroups, CPUs, memory, namespaces, fault kinds.

`chaos-agent check` prints it; the agent probes it once at start and puts it
into its retained status, so the coordinator only sends what can run here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil

from chaos_agent import wire
from chaos_agent.faults import DRIVERS, load_driver
from chaos_agent.faults.base import Availability, FaultContext, FaultDriver
from chaos_agent.policy import Policy

DriverFactory = Callable[[str, FaultContext], FaultDriver[Any]]

CgroupVersion = Literal["v1", "v2", "none"]

# A driver's probe should take milliseconds; one that hangs must not stop the
# agent from starting.
PROBE_TIMEOUT_S = 10.0

# The controllers fault kinds need: cpu for CPU stressors, memory for memory.
NEEDED_CONTROLLERS = ("cpu", "memory")


@dataclass
class CgroupFacts:
    version: CgroupVersion
    # v1: controllers with a mounted hierarchy; v2: enabled at the root.
    controllers: list[str]
    v1_mounts: dict[str, str] = field(default_factory=dict)
    v2_mount: str | None = None


@dataclass
class NodeReport:
    cgroup: CgroupFacts
    cpus: int
    memory_total_bytes: int
    netns: list[str]
    faults: dict[str, Availability]

    def capabilities(self) -> wire.Capabilities:
        return capabilities_of(self.cgroup.version, self.faults)

    def to_json(self) -> dict[str, Any]:
        return {
            "cgroup": {
                "version": self.cgroup.version,
                "controllers": self.cgroup.controllers,
                "v1_mounts": self.cgroup.v1_mounts,
                "v2_mount": self.cgroup.v2_mount,
            },
            "cpus": self.cpus,
            "memory_total_bytes": self.memory_total_bytes,
            "netns": self.netns,
            "faults": {
                name: {"ok": a.ok, "reason": a.reason, "facts": a.facts}
                for name, a in self.faults.items()
            },
            "capabilities": self.capabilities().model_dump(mode="json"),
        }


def cgroup_facts(mountinfo: Path = Path("/proc/self/mountinfo")) -> CgroupFacts:
    """Read the cgroup mounts; prefer v2 only where it has cpu and memory.

    Hybrid nodes mount an empty cgroup2 beside v1 hierarchies (this is the
    case on the development machines), so "a cgroup2 mount exists" does not
    mean v2 is usable.
    """
    v1_mounts: dict[str, str] = {}
    v2_mount: str | None = None
    subsystems = _v1_subsystems()
    for line in _read_lines(mountinfo):
        # Fields: ... mount point (4th) ... " - " fstype source super options
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount_point, fstype, options = fields[4], tail[0], tail[2].split(",")
        if fstype == "cgroup2" and v2_mount is None:
            v2_mount = mount_point
        elif fstype == "cgroup":
            for option in options:
                if option in subsystems:
                    v1_mounts[option] = mount_point

    v2_controllers: list[str] = []
    if v2_mount is not None:
        controllers = Path(v2_mount) / "cgroup.controllers"
        v2_controllers = " ".join(_read_lines(controllers)).split()
    if v2_mount and all(c in v2_controllers for c in NEEDED_CONTROLLERS):
        return CgroupFacts("v2", v2_controllers, v1_mounts, v2_mount)
    if v1_mounts:
        return CgroupFacts("v1", sorted(v1_mounts), v1_mounts, v2_mount)
    return CgroupFacts("none", v2_controllers, v1_mounts, v2_mount)


def _v1_subsystems() -> set[str]:
    # /proc/cgroups: name, hierarchy, cgroups, enabled.
    names = set()
    for line in _read_lines(Path("/proc/cgroups")):
        parts = line.split()
        if parts and not parts[0].startswith("#") and parts[-1] == "1":
            names.add(parts[0])
    return names


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def network_namespaces(directory: Path = Path("/run/netns")) -> list[str]:
    try:
        return sorted(entry.name for entry in directory.iterdir())
    except OSError:
        return []


async def probe_driver(
    fault_type: str, factory: DriverFactory, context: FaultContext
) -> Availability:
    """The driver's own answer, or why it cannot even be asked."""
    try:
        driver = factory(fault_type, context)
    except ImportError as exc:
        return Availability(False, f"driver module is not part of this build: {exc}")
    except Exception as exc:  # any broken driver must not stop the agent
        return Availability(False, f"driver cannot be loaded: {exc!r}")
    try:
        return await asyncio.wait_for(driver.available(), PROBE_TIMEOUT_S)
    except TimeoutError:
        return Availability(False, f"probe did not answer in {PROBE_TIMEOUT_S:g}s")
    except Exception as exc:  # a probe that raises means "unavailable", not a crash
        return Availability(False, f"probe failed: {exc!r}")


async def probe_faults(
    factory: DriverFactory, context: FaultContext
) -> dict[str, Availability]:
    names = list(DRIVERS)
    results = await asyncio.gather(
        *(probe_driver(name, factory, context) for name in names)
    )
    return dict(zip(names, results, strict=True))


def capabilities_of(
    cgroup: CgroupVersion, faults: dict[str, Availability]
) -> wire.Capabilities:
    def fact(fault_type: str, name: str) -> Any:
        availability = faults.get(fault_type)
        return availability.facts.get(name) if availability else None

    engines = fact("latency", "engines") or []
    return wire.Capabilities(
        faults=sorted(name for name, a in faults.items() if a.ok),
        cgroup=cgroup,
        netem=bool(fact("latency", "netem")),
        tbf=bool(fact("bandwidth", "tbf")),
        nftables=bool(fact("partition", "nftables")),
        latency_engines=[e for e in engines if e in ("netem", "proxy")],
        missing={
            name: a.reason or "unavailable" for name, a in faults.items() if not a.ok
        },
    )


async def inspect_node(
    factory: DriverFactory, context: FaultContext, *, isolated: bool = False
) -> NodeReport:
    """What this node can do. `isolated` probes the real drivers in a child
    process (see `probe_faults_isolated`); `factory` is then not used."""
    faults = (
        await probe_faults_isolated(context)
        if isolated
        else await probe_faults(factory, context)
    )
    return NodeReport(
        cgroup=cgroup_facts(),
        cpus=os.cpu_count() or 1,
        memory_total_bytes=psutil.virtual_memory().total,
        netns=network_namespaces(),
        faults=faults,
    )


async def probe_faults_isolated(context: FaultContext) -> dict[str, Availability]:
    """`probe_faults` with the real drivers, in a short-lived child process.

    Probing imports every driver and what it needs (pyroute2 alone is ~9 MB
    resident); in a child, none of that stays in the long-running agent,
    which loads a driver only when a fault of its kind arrives. Costs one
    interpreter start (~1 s of CPU) at agent start. If the child fails, the
    probes run in this process instead (and the memory stays).
    """
    request = {
        "policy": context.policy.model_dump(mode="json"),
        "state_dir": str(context.state_dir),
        "cgroup_root": context.cgroup_root,
        "broker_host": context.broker_host,
        "broker_port": context.broker_port,
        "agent_pid": context.agent_pid,
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chaos_agent.capabilities",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stderr = b""
    try:
        stdout, stderr = await asyncio.wait_for(
            child.communicate(json.dumps(request).encode()), 3 * PROBE_TIMEOUT_S
        )
        answers = json.loads(stdout)
        return {
            name: Availability(bool(a["ok"]), str(a["reason"]), dict(a["facts"]))
            for name, a in answers.items()
        }
    except (TimeoutError, ValueError, KeyError, TypeError) as exc:
        if child.returncode is None:
            child.kill()
            await child.wait()
        context.log.warning(
            "probe_child_failed",
            error=repr(exc),
            exit_code=child.returncode,
            stderr=stderr.decode(errors="replace")[-2000:],
            hint="probing in the agent process instead",
        )
        return await probe_faults(load_driver, context)


def _probe_child() -> None:
    """The child side of `probe_faults_isolated`: context on stdin, every
    driver's availability as JSON on stdout."""
    request = json.load(sys.stdin)
    context = FaultContext(
        policy=Policy.model_validate(request["policy"]),
        state_dir=Path(request["state_dir"]),
        cgroup_root=request["cgroup_root"],
        broker_host=request["broker_host"],
        broker_port=request["broker_port"],
        agent_pid=request["agent_pid"],
    )
    faults = asyncio.run(probe_faults(load_driver, context))
    answers = {name: dataclasses.asdict(a) for name, a in faults.items()}
    json.dump(answers, sys.stdout, default=str)


if __name__ == "__main__":
    _probe_child()
