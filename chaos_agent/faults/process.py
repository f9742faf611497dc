"""Process faults: kill with any signal, or pause (SIGSTOP, SIGCONT on revert).

Parameters: the action (`kill` or `pause`), the signal of a kill, and one
selector: an exact process name (or argv[0] basename; every match is taken
and listed), a pid, a pidfile, or a cgroup (every pid in its `cgroup.procs`).

Never touched: pid 1, kernel threads, the agent itself and its ancestors, and
the names in `policy.protected_processes`. A selection that includes any of
them is refused as a whole, so a broad name cannot half-apply.

The record holds each target's pid *and* create time: revert sends SIGCONT
only to the process that was paused, never to a process that later got the
same pid. A kill cannot be undone; its revert is a no-op that says so. A pause
must be reverted on every path, and revert needs nothing but the record, so a
freshly started agent resumes what a dead one paused.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any, Final

import psutil

from chaos_agent.faults.base import (
    Availability,
    FaultDriver,
    FaultFailed,
    FaultRejected,
    Record,
)
from chaos_agent.policy import PolicyViolation
from chaos_agent.wire import ProcessFault

# Signals that stop a process: as a "kill" they would be a pause that nobody
# reverts, so they are only reachable through the pause action.
STOP_SIGNALS: Final = frozenset(
    {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
)
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
# psutil derives create_time from boot time and start ticks (10 ms): equal
# within a tick means the same process.
SAME_PROCESS_TOLERANCE_S: Final = 0.01
VERIFY_TIMEOUT_S: Final = 3.0
STOPPED_STATES: Final = frozenset({psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP})


class ProcessDriver(FaultDriver[ProcessFault]):
    type = "process"

    async def available(self) -> Availability:
        return Availability(
            ok=True, facts={"selectors": ["name", "pid", "pidfile", "cgroup"]}
        )

    # ---------------------------------------------------------- parameters

    def check(self, fault: ProcessFault) -> None:
        signum = signal_of(fault.signal)
        if fault.action == "kill" and signum in STOP_SIGNALS:
            msg = (
                f"{signum.name} stops a process without anyone resuming it; "
                "use action 'pause', which sends SIGCONT on revert"
            )
            raise FaultRejected(msg)
        if fault.pid is not None:
            self._refuse_protected([_process(fault.pid, f"pid {fault.pid}")])

    def _resolve(self, fault: ProcessFault) -> tuple[str, list[psutil.Process]]:
        """(how the targets were selected, the processes) for `fault`."""
        if fault.pid is not None:
            return f"pid {fault.pid}", [_process(fault.pid, f"pid {fault.pid}")]
        if fault.pidfile is not None:
            pid = _read_pidfile(Path(fault.pidfile))
            where = f"pidfile {fault.pidfile} (pid {pid})"
            return where, [_process(pid, where)]
        if fault.cgroup is not None:
            procs = _cgroup_procs_file(fault.cgroup)
            pids = [int(line) for line in procs.read_text().split() if line.strip()]
            found = [p for p in (_maybe_process(pid) for pid in pids) if p]
            return f"cgroup {procs.parent}", found
        assert fault.name is not None, "the wire model requires one selector"
        return f"name {fault.name!r}", _processes_named(fault.name)

    def _refuse_protected(self, processes: list[psutil.Process]) -> None:
        agent = _maybe_process(self.context.agent_pid)
        ancestors = {p.pid for p in agent.parents()} if agent else set()
        protected_names = set(self.context.policy.protected_processes)
        for process in processes:
            pid = process.pid
            if pid == 1 or pid == self.context.agent_pid or pid in ancestors:
                msg = (
                    f"pid {pid} is pid 1, the agent itself or one of its parents: "
                    "a process fault never touches those"
                )
                raise FaultRejected(msg)
            if _is_kernel_thread(process):
                msg = f"pid {pid} is a kernel thread; signals do not apply to it"
                raise FaultRejected(msg)
            names = _names(process) & protected_names
            if names:
                msg = (
                    f"pid {pid} ({', '.join(sorted(names))}) is in this agent's "
                    "protected_processes; remove it there to allow this fault"
                )
                raise PolicyViolation(msg)

    # ------------------------------------------------------------- prepare

    async def prepare(self, fault_id: str, fault: ProcessFault) -> Record:
        self.check(fault)
        selected_by, processes = self._resolve(fault)
        if not processes:
            msg = f"no running process matches {selected_by}; nothing to do"
            raise FaultRejected(msg)
        self._refuse_protected(processes)

        signum = signal.SIGSTOP if fault.action == "pause" else signal_of(fault.signal)
        described = [d for d in (_describe(p) for p in processes) if d]
        if not described:
            msg = f"every process of {selected_by} exited while being selected"
            raise FaultRejected(msg)
        return {
            "action": fault.action,
            "signal": signum.name,
            "selected_by": selected_by,
            "processes": described,
        }

    # --------------------------------------------------------------- apply

    async def apply(
        self, fault_id: str, fault: ProcessFault, record: Record
    ) -> dict[str, Any]:
        signum = signal.Signals[record["signal"]]
        signalled, skipped = [], []
        for target in record["processes"]:
            process = _same_process(target)
            if process is None:
                skipped.append({**target, "why": "exited before the fault"})
                continue
            try:
                os.kill(process.pid, signum)
            except ProcessLookupError:
                skipped.append({**target, "why": "exited before the fault"})
                continue
            signalled.append(target)
        if not signalled:
            msg = f"every process of {record['selected_by']} exited before the fault"
            raise FaultFailed(msg)

        verified = await _verify(record["action"], signum, signalled)
        if record["action"] == "pause" and not any(
            v["observed"] == "stopped" for v in verified
        ):
            msg = f"no process of {record['selected_by']} stopped after SIGSTOP"
            raise FaultFailed(msg)
        self.context.log.info(
            "fault_applied",
            fault="process",
            action=record["action"],
            signal=signum.name,
            pids=[t["pid"] for t in signalled],
        )
        return {
            "action": record["action"],
            "signal": signum.name,
            "selected_by": record["selected_by"],
            "processes": verified,
            "skipped": skipped,
            "revert": (
                "SIGCONT to these processes"
                if record["action"] == "pause"
                else "none: a kill cannot be undone"
            ),
        }

    # -------------------------------------------------------------- revert

    async def revert(self, record: Record) -> dict[str, Any]:
        if record.get("action") != "pause":
            return {
                "reverted": [],
                "note": "a kill cannot be undone; nothing to revert",
            }

        resumed: list[int] = []
        gone: list[int] = []
        recycled: list[int] = []
        for target in record.get("processes", []):
            process = _same_process(target)
            if process is None:
                still_there = _maybe_process(target["pid"]) is not None
                (recycled if still_there else gone).append(target["pid"])
                continue
            try:
                os.kill(process.pid, signal.SIGCONT)
            except ProcessLookupError:
                gone.append(target["pid"])
                continue
            resumed.append(target["pid"])

        self.context.log.info(
            "fault_reverted", fault="process", resumed=resumed, gone=gone
        )
        if recycled:
            # Heals itself: the paused process is gone; its pid now names another.
            self.context.log.warning("pid_recycled_not_resumed", pids=recycled)
        return {"resumed": resumed, "already_gone": gone, "pid_recycled": recycled}


# ---------------------------------------------------------------- helpers


def signal_of(name: str) -> signal.Signals:
    """The signal called `name` (`SIGTERM` or `TERM`), or FaultRejected."""
    full = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return signal.Signals[full]
    except KeyError:
        msg = f"unknown signal {name!r}; use a name such as SIGTERM, SIGKILL, SIGUSR1"
        raise FaultRejected(msg) from None


def _process(pid: int, where: str) -> psutil.Process:
    process = _maybe_process(pid)
    if process is None:
        msg = f"no running process with {where}"
        raise FaultRejected(msg)
    return process


def _maybe_process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def _read_pidfile(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        msg = f"cannot read pidfile {str(path)!r}: {exc.strerror}"
        raise FaultRejected(msg) from None
    if not text.isdigit() or int(text) < 2:
        msg = f"pidfile {str(path)!r} holds {text[:32]!r}, not a pid"
        raise FaultRejected(msg)
    return int(text)


def _cgroup_procs_file(cgroup: str) -> Path:
    """`cgroup.procs` of an absolute cgroup directory or one relative to a
    hierarchy (`aftershock/app` is looked up under every mounted hierarchy)."""
    path = Path(cgroup)
    if ".." in path.parts:
        msg = f"cgroup {cgroup!r} must not contain '..'"
        raise FaultRejected(msg)
    if path.is_absolute():
        if not path.is_relative_to(CGROUP_ROOT):
            msg = f"cgroup {cgroup!r} is not under {CGROUP_ROOT}"
            raise FaultRejected(msg)
        candidates = [path / "cgroup.procs"]
    else:
        candidates = [CGROUP_ROOT / path / "cgroup.procs"]
        candidates += sorted(CGROUP_ROOT.glob(f"*/{path}/cgroup.procs"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    msg = f"cgroup {cgroup!r} not found under {CGROUP_ROOT} (no cgroup.procs)"
    raise FaultRejected(msg)


def _names(process: psutil.Process) -> set[str]:
    """The process's name and the basename of its argv[0]."""
    names = set()
    try:
        names.add(process.name())
        cmdline = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return names
    if cmdline:
        names.add(os.path.basename(cmdline[0]))
    return names


def _processes_named(name: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter() if name in _names(p)]


def _is_kernel_thread(process: psutil.Process) -> bool:
    try:
        return process.pid == 2 or process.ppid() == 2
    except psutil.Error:
        return False


def _describe(process: psutil.Process) -> dict[str, Any] | None:
    try:
        return {
            "pid": process.pid,
            "create_time": process.create_time(),
            "name": process.name(),
        }
    except psutil.Error:
        return None


def _same_process(target: dict[str, Any]) -> psutil.Process | None:
    """The recorded process if it still runs under its pid, else None."""
    process = _maybe_process(int(target["pid"]))
    if process is None:
        return None
    try:
        created = process.create_time()
    except psutil.Error:
        return None
    if abs(created - float(target["create_time"])) > SAME_PROCESS_TOLERANCE_S:
        return None
    return process


async def _verify(
    action: str, signum: signal.Signals, targets: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each target with what was observed: stopped, exited, or still running."""
    deadline = time.monotonic() + VERIFY_TIMEOUT_S
    observed = {t["pid"]: _observe(t) for t in targets}
    expect = "stopped" if action == "pause" else "exited"
    waits_for_effect = action == "pause" or signum == signal.SIGKILL
    while waits_for_effect and time.monotonic() < deadline:
        if all(state == expect for state in observed.values()):
            break
        await asyncio.sleep(0.01)
        observed = {t["pid"]: _observe(t) for t in targets}
    return [{**t, "observed": observed[t["pid"]]} for t in targets]


def _observe(target: dict[str, Any]) -> str:
    process = _same_process(target)
    if process is None:
        return "exited"
    try:
        status = process.status()
    except psutil.Error:
        return "exited"
    if status == psutil.STATUS_ZOMBIE:
        return "exited"
    return "stopped" if status in STOPPED_STATES else "running"
