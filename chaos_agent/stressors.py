"""Stressor worker processes: `python -m chaos_agent.stressors cpu|memory ...`.

Each worker is one small process that the agent starts without a shell and
places in the fault's cgroup before it does any work:

1. it asks the kernel to SIGKILL it when its parent dies (PR_SET_PDEATHSIG)
   and then checks that its parent is still the agent named by
   `--parent-pid`, which closes the window in which the agent died before
   the request was made;
2. it waits for one byte on stdin, the gate: the agent moves it into the
   fault's cgroup first and only then writes the byte. End of file instead
   (the agent died before releasing it) makes it exit without working;
3. it prints WORKING_LINE, so the agent knows it is armed and at work, and
   works (a CPU duty cycle, or resident memory) until killed, or until its
   own deadline `--max-seconds` passes, the last safety net.

`--fault-id` is not used by the worker: it is in the command line so that the
agent can tell its own stressors from any other process before killing one.

The agent side (`start_workers`, `kill_strays`) lives here too, so that how a
worker is started and how it behaves read in one place. The module imports
only the standard library (asyncio only where the agent side needs it), so a
worker starts quickly.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import asyncio

    from chaos_agent.cgroups import FaultCgroup

MODULE: Final = "chaos_agent.stressors"

_PR_SET_PDEATHSIG: Final = 1
# One duty cycle: short enough that a 100 ms latency probe sees the load as
# steady, long enough that the clock reads cost little of it.
DEFAULT_PERIOD_S: Final = 0.1
# Memory is touched in chunks this large, one chunk per ramp step at most.
_CHUNK_BYTES: Final = 1024 * 1024
# Lines a worker prints on stdout for the agent: WORKING_LINE once released
# and armed; a memory worker then `resident <bytes> <mapping address, hex>`
# once all its memory is resident.
WORKING_LINE: Final = "working"
READY_LINE: Final = "resident"
# How long a released worker may take to say it is working: the interpreter
# starts in ~60 ms here, but in seconds on a small or overloaded node.
_WORKING_TIMEOUT_S: Final = 30.0


def command_line(
    kind: str,
    fault_id: str,
    max_seconds: float,
    *options: str,
    python: str = sys.executable,
    parent_pid: int | None = None,
) -> list[str]:
    """The argv that starts one worker (no shell involved) from this process,
    or from `parent_pid`."""
    return [
        python,
        "-m",
        MODULE,
        "--fault-id",
        fault_id,
        "--max-seconds",
        f"{max_seconds:g}",
        "--parent-pid",
        str(parent_pid if parent_pid is not None else os.getpid()),
        kind,
        *options,
    ]


def is_stressor_of(cmdline: Sequence[str], fault_id: str) -> bool:
    """True if `cmdline` (as in /proc/<pid>/cmdline) is a worker of `fault_id`."""
    args = list(cmdline)
    for i in range(len(args) - 1):
        if args[i] == "-m" and args[i + 1] == MODULE:
            break
    else:
        return False
    return any(
        args[j] == "--fault-id" and args[j + 1] == fault_id
        for j in range(len(args) - 1)
    )


def die_with_parent(parent_pid: int) -> bool:
    """Be SIGKILLed when the thread that forked this process exits.

    Returns False if the parent is already gone (not `parent_pid` any more):
    then the kernel will never send the signal, and the worker must not work.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        msg = f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}"
        raise OSError(err, msg)
    return os.getppid() == parent_pid


def wait_for_gate() -> bool:
    """Block until the agent releases this worker; False on end of file."""
    return os.read(sys.stdin.fileno(), 1) != b""


def run_cpu(load_percent: float, deadline: float, period_s: float) -> None:
    """Hold `load_percent` of one core until `deadline` (monotonic).

    Each period the worker spins until its own CPU time reaches the share due
    by the end of that period, counted from the start, then sleeps out the
    rest. Time lost to preemption is made up in the next periods, so the
    average converges on the target instead of drifting below it.
    """
    share = load_percent / 100.0
    started_wall = time.monotonic()
    # The interpreter's start-up is not counted: on a slow node it can take
    # seconds, which the worker would then sit out idle.
    started_cpu = time.process_time()
    period_end = started_wall + period_s

    while period_end < deadline:
        due_cpu = share * (period_end - started_wall)
        used_cpu = time.process_time() - started_cpu
        # A worker starved by a busy node does not then hog a core for
        # seconds to catch up: at most one period of debt is carried.
        if due_cpu - used_cpu > period_s:
            started_cpu -= due_cpu - used_cpu - period_s
        while (
            time.process_time() - started_cpu < due_cpu
            and time.monotonic() < period_end
        ):
            _spin()
        idle = period_end - time.monotonic()
        if idle > 0:
            time.sleep(idle)
        period_end += period_s


def _spin() -> None:
    # A few microseconds of pure interpreter work between clock reads.
    x = 0
    for i in range(200):
        x += i * i


def run_memory(size_bytes: int, ramp_s: float, deadline: float) -> None:
    """Make `size_bytes` of anonymous memory resident over `ramp_s`, print
    READY_LINE, then hold it until `deadline` (monotonic)."""
    # Raise our own OOM score so that, even if a limit above the fault's
    # cgroup is hit, the kernel picks this worker before anything else.
    _write_quietly("/proc/self/oom_score_adj", "1000")
    area = mmap.mmap(-1, size_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # Small pages, which also keep the kernel from merging this mapping with
    # its neighbours, so its resident size in smaps is this fault's alone.
    area.madvise(mmap.MADV_NOHUGEPAGE)
    # Non-zero bytes, so no zero-page or same-page merging can undo the fill.
    pattern = b"\xa5" * _CHUNK_BYTES
    started = time.monotonic()

    filled = 0
    while filled < size_bytes:
        chunk = min(_CHUNK_BYTES, size_bytes - filled)
        area[filled : filled + chunk] = pattern[:chunk]
        filled += chunk
        if ramp_s > 0:
            on_schedule_at = started + ramp_s * filled / size_bytes
            delay = on_schedule_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    # The address lets the agent find this mapping in /proc/<pid>/smaps and
    # read how much of it, not of the interpreter, is resident.
    address = ctypes.addressof(ctypes.c_char.from_buffer(area))
    print(READY_LINE, filled, f"{address:x}", flush=True)
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 60.0))


def mapping_resident_bytes(pid: int, address: int) -> int | None:
    """Resident bytes of the mapping of process `pid` that holds `address`
    (from /proc/<pid>/smaps), or None if there is no such mapping."""
    try:
        smaps = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    inside = False
    for line in smaps.splitlines():
        first = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in first and not first.endswith(":"):
            start, _, end = first.partition("-")
            inside = int(start, 16) <= address < int(end, 16)
        elif inside and first == "Rss:":
            return int(line.split()[1]) * 1024
    return None


def _write_quietly(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description=(
            "An Aftershock stressor worker. The agent starts it paused: it "
            "works only after one byte arrives on stdin, and dies with its "
            "parent or at --max-seconds, whichever comes first."
        ),
    )
    parser.add_argument("--fault-id", required=True, help="fault this worker serves")
    parser.add_argument(
        "--parent-pid",
        type=int,
        required=True,
        help="pid of the agent; the worker exits at once if it is not its parent",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        required=True,
        help="exit after this long whatever happens (the last safety net)",
    )
    kinds = parser.add_subparsers(dest="kind", required=True)
    cpu = kinds.add_parser("cpu", help="hold a share of one core")
    cpu.add_argument("--load-percent", type=float, required=True)
    cpu.add_argument("--period-s", type=float, default=DEFAULT_PERIOD_S)
    memory = kinds.add_parser("memory", help="hold resident anonymous memory")
    memory.add_argument("--bytes", type=int, required=True, dest="size_bytes")
    memory.add_argument("--ramp-s", type=float, default=0.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not die_with_parent(args.parent_pid) or not wait_for_gate():
        return 0
    deadline = time.monotonic() + args.max_seconds
    print(WORKING_LINE, flush=True)

    if args.kind == "cpu":
        if not 0 < args.load_percent <= 100:
            print("--load-percent must be in (0, 100]", file=sys.stderr)
            return 2
        run_cpu(args.load_percent, deadline, args.period_s)
    else:
        if args.size_bytes <= 0:
            print("--bytes must be positive", file=sys.stderr)
            return 2
        run_memory(args.size_bytes, args.ramp_s, deadline)
    return 0


# ---------------------------------------------------------------- agent side


class WorkerFailed(Exception):
    """A worker could not be started, placed in its cgroup, or did not start
    working."""


async def start_workers(
    cgroup: FaultCgroup,
    argvs: Sequence[Sequence[str]],
    started_pids: list[int],
) -> list[asyncio.subprocess.Process]:
    """Start one worker per argv inside `cgroup`, release them, and return
    once every one has said it is armed and working.

    Each worker is started paused, moved into the cgroup, and only then given
    its gate byte, so not a cycle of its work happens outside the cgroup.
    Pids are appended to `started_pids` as soon as they exist, so a caller
    that journals that list can clean up after a failure half-way. The
    workers' stdout stays a pipe for the caller (a memory worker's
    READY_LINE).

    Call this from the thread that runs the agent's event loop and lives as
    long as the agent: PR_SET_PDEATHSIG fires when the *thread* that forked
    the worker exits, so a worker forked from a short-lived executor thread
    would die with that thread.
    """
    import asyncio  # here, not at the top: it triples a worker's start-up time

    processes: list[asyncio.subprocess.Process] = []
    for argv in argvs:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # Its own session: a Ctrl-C meant for the agent reaches the agent,
            # which reverts, and not the workers behind its back.
            start_new_session=True,
        )
        started_pids.append(process.pid)
        processes.append(process)
        try:
            cgroup.add_pid(process.pid)
        except Exception as exc:
            # Still paused on their gate: nothing ran, so kill them quietly.
            for paused in processes:
                with contextlib.suppress(ProcessLookupError):
                    paused.kill()
            msg = f"cannot place worker {process.pid} in its cgroup: {exc}"
            raise WorkerFailed(msg) from exc

    for process in processes:
        assert process.stdin is not None  # stdin=PIPE above
        process.stdin.write(b"g")
        with contextlib.suppress(ConnectionError):
            await process.stdin.drain()
        process.stdin.close()

    for process in processes:
        await _expect_working(process)
    return processes


async def _expect_working(process: asyncio.subprocess.Process) -> None:
    import asyncio

    assert process.stdout is not None  # stdout=PIPE in start_workers
    line = b""
    with contextlib.suppress(TimeoutError):
        line = await asyncio.wait_for(process.stdout.readline(), _WORKING_TIMEOUT_S)
    if line.strip() != WORKING_LINE.encode():
        state = "exited" if process.returncode is not None else "is silent"
        msg = f"worker {process.pid} {state} instead of starting work"
        raise WorkerFailed(msg)


def kill_strays(pids: Sequence[int], fault_id: str) -> list[int]:
    """SIGKILL those of `pids` that are still workers of `fault_id`.

    For a revert that finds the cgroup gone (or a worker moved out of it).
    The command line is read first: a recorded pid may belong to an unrelated
    process by now, and that one must not be touched.
    """
    killed = []
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if is_stressor_of(raw.decode(errors="replace").split("\0"), fault_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


if __name__ == "__main__":
    sys.exit(main())
