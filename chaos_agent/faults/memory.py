"""Memory pressure: one worker holding resident anonymous memory in a cgroup.

Parameters: `bytes` or `percent` of the node's total memory, and `ramp_s`,
the time over which the worker makes it resident. OOM safety comes in three
layers:

1. check: refuse a size that exceeds the policy's `max_memory_percent`, or
   that would leave less than `memory_reserve_bytes` available on the node,
   or that does not fit under the limits of the cgroups above the agent;
2. the fault's cgroup is limited to slightly more than the asked bytes, so
   if anything overruns, the OOM killer acts inside that cgroup, where the
   worker is the only process;
3. the worker sets its own oom_score_adj to 1000, so that even an OOM above
   the cgroup picks it first.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, ClassVar, Final

import psutil

from chaos_agent import stressors
from chaos_agent.cgroups import (
    CgroupError,
    CgroupLayout,
    FaultCgroup,
    controller_availability,
    detect_layout,
    memory_headroom_bytes,
)
from chaos_agent.faults.base import (
    Availability,
    FaultDriver,
    FaultFailed,
    FaultRejected,
    Record,
)
from chaos_agent.faults.cpu import WORKER_DEADLINE_MARGIN_S, revert_stressors
from chaos_agent.policy import PolicyViolation
from chaos_agent.wire import MemoryFault

MiB: Final = 1024 * 1024
# What the worker needs on top of the asked bytes: the interpreter (~10 MiB
# resident), page tables (8 bytes per 4 KiB page) and some slack.
_WORKER_OVERHEAD_BYTES: Final = 32 * MiB
# Ancestor cgroups must keep this much free for the agent itself.
_AGENT_MARGIN_BYTES: Final = 64 * MiB
# Apply waits for the whole ramp only when it is this short; a longer ramp is
# reported as started and its progress shows in telemetry.
APPLY_WAITS_FOR_RAMP_S: Final = 10.0
# Time to fault in memory after the ramp, at a pessimistic 256 MiB/s.
_FILL_BYTES_PER_S: Final = 256 * MiB
# Resident within this share of the asked bytes counts as verified.
RESIDENT_TOLERANCE: Final = 0.10


def memory_limit_bytes(size_bytes: int) -> int:
    """The fault cgroup's limit: the asked bytes plus the worker's overhead."""
    return size_bytes + _WORKER_OVERHEAD_BYTES + size_bytes // 256


class MemoryDriver(FaultDriver[MemoryFault]):
    type: ClassVar[str] = "memory"

    async def available(self) -> Availability:
        layout, reason = controller_availability("memory", self.context.cgroup_root)
        if layout is None:
            return Availability(ok=False, reason=reason)
        total = psutil.virtual_memory().total
        return Availability(ok=True, facts={**layout.facts(), "memory_bytes": total})

    def size_bytes(self, fault: MemoryFault) -> int:
        """The asked size in bytes (`percent` is of the node's total)."""
        if fault.bytes is not None:
            return fault.bytes
        assert fault.percent is not None  # the wire model requires one of them
        return int(psutil.virtual_memory().total * fault.percent / 100)

    def check(self, fault: MemoryFault) -> None:
        layout = detect_layout()
        if layout is None or not layout.has("memory"):
            msg = "this node has no cgroup memory controller (see `chaos-agent check`)"
            raise FaultRejected(msg)
        self._check_budget(self.size_bytes(fault), layout)

    def _check_budget(self, size: int, layout: CgroupLayout) -> None:
        policy = self.context.policy
        memory = psutil.virtual_memory()

        cap = int(memory.total * policy.max_memory_percent / 100)
        if size > cap:
            msg = (
                f"{_mib(size)} is more than this agent's max_memory_percent "
                f"({policy.max_memory_percent:g}% of {_mib(memory.total)} = "
                f"{_mib(cap)}); ask for less or raise the policy"
            )
            raise PolicyViolation(msg)

        reserve = policy.memory_reserve_bytes
        left = memory.available - memory_limit_bytes(size)
        if left < reserve:
            most = max(0, memory.available - reserve - _WORKER_OVERHEAD_BYTES)
            msg = (
                f"{_mib(size)} would leave {_mib(max(left, 0))} available on this "
                f"node, below its memory_reserve_bytes ({_mib(reserve)}); at most "
                f"about {_mib(most)} can be asked now"
            )
            raise PolicyViolation(msg)

        headroom = memory_headroom_bytes(layout, self.context.cgroup_root)
        if headroom is not None and headroom - memory_limit_bytes(size) < (
            _AGENT_MARGIN_BYTES
        ):
            msg = (
                f"{_mib(size)} does not fit under the memory limit of the agent's "
                f"cgroup, which has {_mib(headroom)} left; the agent itself would "
                "be at risk of the OOM killer"
            )
            raise FaultRejected(msg)

    async def prepare(self, fault_id: str, fault: MemoryFault) -> Record:
        layout = detect_layout()
        if layout is None:
            msg = "cgroups disappeared from this node since the fault was checked"
            raise FaultRejected(msg)
        try:
            cgroup = FaultCgroup.for_fault(
                layout, self.context.cgroup_root, fault_id, ("memory",)
            )
        except CgroupError as exc:
            raise FaultRejected(str(exc)) from exc
        return {
            "fault_id": fault_id,
            "cgroup": cgroup.to_record(),
            "pids": [],
            "size_bytes": self.size_bytes(fault),
        }

    async def apply(
        self, fault_id: str, fault: MemoryFault, record: Record
    ) -> dict[str, Any]:
        log = self.context.log.bind(fault="memory", fault_id=fault_id)
        cgroup = FaultCgroup.from_record(record["cgroup"])
        size = int(record["size_bytes"])
        limit = memory_limit_bytes(size)
        max_seconds = self.context.policy.max_duration_s + WORKER_DEADLINE_MARGIN_S
        argv = stressors.command_line(
            "memory",
            fault_id,
            max_seconds,
            "--bytes",
            str(size),
            "--ramp-s",
            f"{fault.ramp_s:g}",
        )

        # Memory may have been taken since check(); look again right before.
        layout = detect_layout()
        if layout is None:
            raise FaultFailed("cgroups disappeared from this node")
        try:
            self._check_budget(size, layout)
        except (PolicyViolation, FaultRejected) as exc:
            raise FaultFailed(f"no longer fits: {exc}") from exc

        try:
            cgroup.create()
            cgroup.set_memory_limit(limit)
            (worker,) = await stressors.start_workers(cgroup, [argv], record["pids"])
            if fault.ramp_s > APPLY_WAITS_FOR_RAMP_S:
                detail = _ramp_started(worker.pid, fault.ramp_s)
            else:
                timeout = fault.ramp_s + 5 + size / _FILL_BYTES_PER_S
                detail = await _verify_resident(worker, size, timeout)
        except (CgroupError, stressors.WorkerFailed, OSError, FaultFailed) as exc:
            log.warning("fault_apply_failed", error=str(exc))
            await self.revert(record)
            if isinstance(exc, FaultFailed):
                raise
            raise FaultFailed(f"memory fault could not start: {exc}") from exc

        detail |= {
            "asked_bytes": size,
            "limit_bytes": limit,
            "cgroup": [str(d) for d in cgroup.unique_dirs],
            "cgroup_usage_bytes": cgroup.memory_usage_bytes(),
            "pids": list(record["pids"]),
        }
        log.info("fault_applied", asked_bytes=size, ramp_s=fault.ramp_s)
        return detail

    async def revert(self, record: Record) -> dict[str, Any]:
        return await revert_stressors(record)


def _ramp_started(pid: int, ramp_s: float) -> dict[str, Any]:
    return {
        "ramp": "started",
        "ramp_s": ramp_s,
        "resident_bytes": _rss(pid),
    }


async def _verify_resident(
    worker: asyncio.subprocess.Process, size: int, timeout_s: float
) -> dict[str, Any]:
    """Wait for the worker to report its memory resident, then read its RSS."""
    assert worker.stdout is not None  # start_workers leaves it a pipe
    line = b""
    with contextlib.suppress(TimeoutError):
        line = await asyncio.wait_for(worker.stdout.readline(), timeout_s)
    words = line.decode(errors="replace").split()
    if len(words) != 3 or words[0] != stressors.READY_LINE:
        code = worker.returncode
        why = "it was OOM-killed or crashed" if code is not None else "it is too slow"
        msg = f"memory worker {worker.pid} did not fill {_mib(size)} ({why})"
        raise FaultFailed(msg)

    resident = stressors.mapping_resident_bytes(worker.pid, int(words[2], 16))
    if resident is None or resident < size * (1 - RESIDENT_TOLERANCE):
        msg = (
            f"memory worker {worker.pid} holds {_mib(resident or 0)} resident "
            f"of the {_mib(size)} asked"
        )
        raise FaultFailed(msg)
    return {
        "ramp": "done",
        "resident_bytes": resident,
        "worker_rss_bytes": _rss(worker.pid),
    }


def _rss(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def _mib(size: int) -> str:
    return f"{size / MiB:.0f} MiB"
