"""The process fault driver against real processes (copies of `sleep`)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from chaos_agent.faults.base import FaultContext, FaultFailed, FaultRejected
from chaos_agent.faults.process import ProcessDriver
from chaos_agent.policy import Policy, PolicyViolation
from chaos_agent.wire import ProcessFault

Spawn = Callable[[], subprocess.Popen[bytes]]


@pytest.fixture
def sleeper_name() -> str:
    # Unique and under 15 characters, so the kernel's comm holds all of it and
    # no other process on the machine can match.
    return "ashk" + secrets.token_hex(4)


@pytest.fixture
def spawn(tmp_path: Path, sleeper_name: str) -> Iterator[Spawn]:
    """Start copies of sleep named `sleeper_name`; all killed by pid after."""
    binary = tmp_path / sleeper_name
    shutil.copy(shutil.which("sleep") or "/bin/sleep", binary)
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen([str(binary), "300"])
        started.append(process)
        _wait_for(lambda: psutil.Process(process.pid).name() == sleeper_name)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
            process.wait()


@pytest.fixture
def driver(tmp_path: Path) -> ProcessDriver:
    return ProcessDriver(FaultContext(policy=Policy(), state_dir=tmp_path))


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def _status(pid: int) -> str:
    return str(psutil.Process(pid).status())


async def _inject(driver: ProcessDriver, fault: ProcessFault) -> dict[str, object]:
    driver.check(fault)
    record = await driver.prepare("f1", fault)
    detail = await driver.apply("f1", fault, record)
    return {"record": record, "detail": detail}


async def test_pause_by_pid_stops_the_process_and_revert_resumes_it(
    driver: ProcessDriver, spawn: Spawn
) -> None:
    """Test that pause SIGSTOPs the pid and revert SIGCONTs it."""
    target = spawn()
    fault = ProcessFault(action="pause", pid=target.pid)

    injected = await _inject(driver, fault)
    assert _status(target.pid) == psutil.STATUS_STOPPED

    reverted = await driver.revert(injected["record"])  # type: ignore[arg-type]
    assert reverted["resumed"] == [target.pid]
    assert _status(target.pid) != psutil.STATUS_STOPPED


async def test_pause_by_name_takes_every_match_and_lists_it(
    driver: ProcessDriver, spawn: Spawn, sleeper_name: str
) -> None:
    """Test that a name selects all processes of that name, each listed."""
    first, second = spawn(), spawn()

    injected = await _inject(driver, ProcessFault(action="pause", name=sleeper_name))
    listed = {p["pid"] for p in injected["detail"]["processes"]}  # type: ignore[index]

    assert listed == {first.pid, second.pid}
    assert _status(first.pid) == _status(second.pid) == psutil.STATUS_STOPPED
    await driver.revert(injected["record"])  # type: ignore[arg-type]
    assert psutil.STATUS_STOPPED not in (_status(first.pid), _status(second.pid))


async def test_pause_by_pidfile_reads_the_pid_from_the_file(
    driver: ProcessDriver, spawn: Spawn, tmp_path: Path
) -> None:
    """Test that a pidfile selects the process whose pid it holds."""
    target = spawn()
    pidfile = tmp_path / "target.pid"
    pidfile.write_text(f"{target.pid}\n")

    injected = await _inject(driver, ProcessFault(action="pause", pidfile=str(pidfile)))

    assert _status(target.pid) == psutil.STATUS_STOPPED
    await driver.revert(injected["record"])  # type: ignore[arg-type]


@pytest.mark.root
async def test_pause_by_cgroup_takes_every_pid_in_it(
    driver: ProcessDriver, spawn: Spawn, sleeper_name: str
) -> None:
    """Test that a cgroup selects all of its processes (cgroup v1 cpu)."""
    cgroup = Path("/sys/fs/cgroup/cpu") / f"aftershock-test-{sleeper_name}"
    cgroup.mkdir()
    first, second = spawn(), spawn()
    try:
        for process in (first, second):
            (cgroup / "cgroup.procs").write_text(str(process.pid))

        fault = ProcessFault(action="pause", cgroup=str(cgroup))
        injected = await _inject(driver, fault)

        assert _status(first.pid) == _status(second.pid) == psutil.STATUS_STOPPED
        await driver.revert(injected["record"])  # type: ignore[arg-type]
        assert _status(first.pid) != psutil.STATUS_STOPPED
    finally:
        for process in (first, second):
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
            process.wait()
        cgroup.rmdir()


async def test_kill_sends_the_signal_and_its_revert_is_a_no_op(
    driver: ProcessDriver, spawn: Spawn
) -> None:
    """Test that kill with SIGTERM ends the process and revert says it cannot undo."""
    target = spawn()

    injected = await _inject(driver, ProcessFault(signal="SIGTERM", pid=target.pid))
    assert target.wait(timeout=5) == -signal.SIGTERM

    reverted = await driver.revert(injected["record"])  # type: ignore[arg-type]
    assert "cannot be undone" in reverted["note"]


async def test_revert_works_from_the_journalled_record_in_a_new_driver(
    spawn: Spawn, tmp_path: Path
) -> None:
    """Test that a driver that only sees the record as JSON resumes the pause."""
    target = spawn()
    owner = ProcessDriver(FaultContext(policy=Policy(), state_dir=tmp_path))
    injected = await _inject(owner, ProcessFault(action="pause", pid=target.pid))
    journalled = json.loads(json.dumps(injected["record"]))

    fresh = ProcessDriver(FaultContext(policy=Policy(), state_dir=tmp_path))
    await fresh.revert(journalled)

    assert _status(target.pid) != psutil.STATUS_STOPPED


async def test_revert_never_resumes_a_process_that_reused_the_pid(
    driver: ProcessDriver, spawn: Spawn
) -> None:
    """Test that a recorded create time that does not match leaves the pid alone."""
    target = spawn()
    os.kill(target.pid, signal.SIGSTOP)
    _wait_for(lambda: _status(target.pid) == psutil.STATUS_STOPPED)
    created = psutil.Process(target.pid).create_time()
    record = {
        "action": "pause",
        "signal": "SIGSTOP",
        "selected_by": "test",
        "processes": [{"pid": target.pid, "create_time": created - 60, "name": "x"}],
    }

    reverted = await driver.revert(record)

    assert reverted["pid_recycled"] == [target.pid]
    assert _status(target.pid) == psutil.STATUS_STOPPED


async def test_revert_twice_and_after_exit_counts_as_reverted(
    driver: ProcessDriver, spawn: Spawn
) -> None:
    """Test that reverting a pause whose process is gone reports it gone, no error."""
    target = spawn()
    injected = await _inject(driver, ProcessFault(action="pause", pid=target.pid))
    await driver.revert(injected["record"])  # type: ignore[arg-type]
    target.kill()
    target.wait()

    reverted = await driver.revert(injected["record"])  # type: ignore[arg-type]

    assert reverted["already_gone"] == [target.pid]


@pytest.mark.parametrize("which", ["agent", "agent parent"])
def test_the_agent_and_its_parents_are_refused(
    driver: ProcessDriver, which: str
) -> None:
    """Test that the agent's own lineage can never be selected."""
    pid = os.getpid() if which == "agent" else os.getppid()

    with pytest.raises(FaultRejected, match="agent itself"):
        driver.check(ProcessFault(action="pause", pid=pid))


async def test_a_pidfile_naming_pid_1_is_refused(
    driver: ProcessDriver, tmp_path: Path
) -> None:
    """Test that pid 1 cannot be reached through a pidfile either."""
    pidfile = tmp_path / "init.pid"
    pidfile.write_text("1\n")

    with pytest.raises(FaultRejected, match="not a pid"):
        await driver.prepare("f1", ProcessFault(action="pause", pidfile=str(pidfile)))


async def test_a_protected_name_is_refused_by_policy(
    spawn: Spawn, sleeper_name: str, tmp_path: Path
) -> None:
    """Test that policy.protected_processes refuses the whole selection."""
    target = spawn()
    policy = Policy(protected_processes=[sleeper_name])
    driver = ProcessDriver(FaultContext(policy=policy, state_dir=tmp_path))

    with pytest.raises(PolicyViolation, match="protected_processes"):
        await driver.prepare("f1", ProcessFault(action="pause", name=sleeper_name))
    assert _status(target.pid) != psutil.STATUS_STOPPED


def test_a_stop_signal_as_a_kill_is_refused(driver: ProcessDriver) -> None:
    """Test that kill with SIGSTOP is refused in favour of pause."""
    with pytest.raises(FaultRejected, match="use action 'pause'"):
        driver.check(ProcessFault(signal="SIGSTOP", pid=os.getpid()))


def test_an_unknown_signal_is_refused(driver: ProcessDriver) -> None:
    """Test that a signal name that does not exist is refused with examples."""
    with pytest.raises(FaultRejected, match="unknown signal"):
        driver.check(ProcessFault(signal="SIGNOPE", pid=os.getpid()))


async def test_a_name_that_matches_nothing_is_refused(
    driver: ProcessDriver, sleeper_name: str
) -> None:
    """Test that selecting no process is a rejection, not a silent success."""
    with pytest.raises(FaultRejected, match="no running process"):
        await driver.prepare("f1", ProcessFault(name=sleeper_name))


async def test_apply_fails_when_every_target_exited(
    driver: ProcessDriver, spawn: Spawn
) -> None:
    """Test that apply reports failure when the selected process is gone."""
    target = spawn()
    fault = ProcessFault(action="pause", pid=target.pid)
    record = await driver.prepare("f1", fault)
    target.kill()
    target.wait()

    with pytest.raises(FaultFailed, match="exited"):
        await driver.apply("f1", fault, record)
