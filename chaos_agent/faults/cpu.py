"""CPU pressure: duty-cycle workers in a cgroup with a matching CPU quota.

Parameters: `load_percent` of one core per worker, `workers` (default: one
per CPU the agent may run on). Each worker holds its share by measuring its
own CPU time (see `chaos_agent.stressors.run_cpu`); the cgroup's CFS quota of
`workers * load_percent` of a core is the hard ceiling, so the fault can never
take more than asked even if a worker misbehaves.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, ClassVar, Final

from chaos_agent import stressors
from chaos_agent.cgroups import (
    CFS_PERIOD_US,
    CgroupError,
    FaultCgroup,
    controller_availability,
    detect_layout,
)
from chaos_agent.faults.base import (
    Availability,
    FaultDriver,
    FaultFailed,
    FaultRejected,
    Record,
)
from chaos_agent.policy import PolicyViolation
from chaos_agent.wire import CpuFault

# More workers than this per CPU only add context switches, not load.
MAX_WORKERS_PER_CPU: Final = 4
# The workers' own deadline lies this far past the longest fault the policy
# allows: late enough never to cut a fault short, early enough to end a
# worker whose agent and journal were both lost.
WORKER_DEADLINE_MARGIN_S: Final = 60.0
# How long a released worker may take to show up as running in its cgroup.
_VERIFY_TIMEOUT_S: Final = 5.0
CONTROLLERS: Final = ("cpu", "cpuacct")


def node_cpus() -> int:
    """CPUs this agent may run on (its affinity, not the whole machine)."""
    return len(os.sched_getaffinity(0))


class CpuDriver(FaultDriver[CpuFault]):
    type: ClassVar[str] = "cpu"

    async def available(self) -> Availability:
        layout, reason = controller_availability("cpu", self.context.cgroup_root)
        if layout is None:
            return Availability(ok=False, reason=reason)
        return Availability(ok=True, facts={**layout.facts(), "cpus": node_cpus()})

    def check(self, fault: CpuFault) -> None:
        cap = self.context.policy.max_cpu_load_percent
        if fault.load_percent > cap:
            msg = (
                f"load_percent {fault.load_percent} exceeds this agent's "
                f"max_cpu_load_percent ({cap}); raise it in the agent's policy"
            )
            raise PolicyViolation(msg)

        max_workers = MAX_WORKERS_PER_CPU * node_cpus()
        if self.workers(fault) > max_workers:
            msg = (
                f"{fault.workers} workers is more than {MAX_WORKERS_PER_CPU} per CPU "
                f"({max_workers} on this node); more workers add no load, ask "
                "for a higher load_percent instead"
            )
            raise FaultRejected(msg)

        layout = detect_layout()
        if layout is None or not layout.has("cpu"):
            msg = "this node has no cgroup cpu controller (see `chaos-agent check`)"
            raise FaultRejected(msg)

    @staticmethod
    def workers(fault: CpuFault) -> int:
        return fault.workers if fault.workers is not None else node_cpus()

    async def prepare(self, fault_id: str, fault: CpuFault) -> Record:
        layout = detect_layout()
        if layout is None:
            msg = "cgroups disappeared from this node since the fault was checked"
            raise FaultRejected(msg)
        try:
            cgroup = FaultCgroup.for_fault(
                layout, self.context.cgroup_root, fault_id, CONTROLLERS
            )
        except CgroupError as exc:
            raise FaultRejected(str(exc)) from exc
        return {"fault_id": fault_id, "cgroup": cgroup.to_record(), "pids": []}

    async def apply(
        self, fault_id: str, fault: CpuFault, record: Record
    ) -> dict[str, Any]:
        log = self.context.log.bind(fault="cpu", fault_id=fault_id)
        cgroup = FaultCgroup.from_record(record["cgroup"])
        workers = self.workers(fault)
        max_seconds = self.context.policy.max_duration_s + WORKER_DEADLINE_MARGIN_S
        argv = stressors.command_line(
            "cpu", fault_id, max_seconds, "--load-percent", str(fault.load_percent)
        )

        try:
            cgroup.create()
            processes = await stressors.start_workers(
                cgroup, [argv] * workers, record["pids"]
            )
            # The quota comes once the workers run: under a quota of a few
            # percent, the interpreter's start-up alone would take seconds.
            # Until then each worker holds its share by its own clock.
            quota_us = cgroup.set_cpu_quota(workers * fault.load_percent / 100)
            await _verify_running(cgroup, [p.pid for p in processes])
        except (CgroupError, stressors.WorkerFailed, OSError) as exc:
            log.warning("fault_apply_failed", error=str(exc))
            await self.revert(record)
            raise FaultFailed(f"cpu fault could not start: {exc}") from exc

        log.info(
            "fault_applied",
            load_percent=fault.load_percent,
            workers=workers,
            quota_us=quota_us,
        )
        return {
            "load_percent": fault.load_percent,
            "workers": workers,
            "pids": list(record["pids"]),
            "cgroup": sorted(str(d) for d in cgroup.unique_dirs),
            "quota_us": quota_us,
            "period_us": CFS_PERIOD_US,
        }

    async def revert(self, record: Record) -> dict[str, Any]:
        return await revert_stressors(record)


async def _verify_running(cgroup: FaultCgroup, pids: list[int]) -> None:
    """Wait until every worker is in the cgroup; raise if one died."""
    deadline = asyncio.get_running_loop().time() + _VERIFY_TIMEOUT_S
    while True:
        missing = set(pids) - cgroup.pids()
        if not missing:
            return
        if asyncio.get_running_loop().time() > deadline:
            msg = f"workers {sorted(missing)} are not running in {cgroup.unique_dirs}"
            raise CgroupError(msg)
        await asyncio.sleep(0.02)


async def revert_stressors(record: Record) -> dict[str, Any]:
    """Kill the workers of a cpu or memory fault and remove its cgroup.

    Idempotent: a cgroup that is gone and workers that are dead count as
    reverted. Recorded pids outside the cgroup are killed only if their
    command line still names this fault's stressor.
    """
    try:
        cgroup = FaultCgroup.from_record(record["cgroup"])
        killed = await asyncio.to_thread(cgroup.remove)
        # Whatever the cgroup no longer holds: a worker moved out of it, or
        # the cgroup was removed by hand while a worker lived on.
        strays = stressors.kill_strays(record.get("pids", []), cgroup.fault_id)
    except (CgroupError, KeyError, TypeError) as exc:
        raise FaultFailed(f"revert incomplete: {exc}") from exc
    return {
        "killed": killed + len(strays),
        "cgroup_removed": sorted(str(d) for d in cgroup.unique_dirs),
    }
