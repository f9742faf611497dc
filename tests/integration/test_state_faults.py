"""Corrupt-state and process faults through the drivers, on real replicas.

How each corruption heals, as these tests show it:
- lowered counters (set 0, scale < 1): a peer's higher copy wins the max-merge
  at the next gossip round;
- raised counters (set up to the capacity): they spread through the max-merge
  too, and heal only as the window moves past their slots;
- impossible counters (negative, NaN, above capacity): ignored and counted as
  corrupt rows; peers' valid copies overwrite them at the next round;
- any of them with `restore`: revert writes the snapshot back;
- a file SQLite cannot read (bytes adapter over the header): moved aside at
  the next start, the replica starts empty and its peers refill it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chaos_agent.faults.base import FaultContext
from chaos_agent.faults.corrupt_state import CorruptStateDriver
from chaos_agent.faults.process import ProcessDriver
from chaos_agent.policy import Policy
from chaos_agent.wire import CorruptStateFault, ProcessFault
from tests.replicas import Cluster, running_replicas

pytestmark = pytest.mark.integration

# A 20 s window: nothing ages out while a test watches gossip heal.
SLOW = "k*=100/5"
# A 6 s window: raised counters age out within the test.
FAST = "w*=30/5"


def _context(tmp_path: Path) -> FaultContext:
    policy = Policy(allowed_state_paths=[tmp_path])
    return FaultContext(policy=policy, state_dir=tmp_path / "agent")


async def _corrupt(
    tmp_path: Path, fault: CorruptStateFault
) -> tuple[CorruptStateDriver, dict[str, Any]]:
    driver = CorruptStateDriver(_context(tmp_path))
    driver.check(fault)
    record = await driver.prepare("f1", fault)
    await driver.apply("f1", fault, record)
    return driver, record


def _eventually(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not true within {timeout}s")


def _files(directory: Path, pattern: str) -> list[Path]:
    return list(directory.glob(pattern))


def _spend(cluster: Cluster, key: str, capacity: float, tokens: int) -> None:
    cluster[1].take(key, tokens)
    cluster.wait_converged(key, capacity, target=0.0, timeout=10)


async def test_lowered_counters_show_as_drift_and_heal_by_max_merge(
    tmp_path: Path,
) -> None:
    """Test that set 0 on one replica raises its tokens, then peers restore it."""
    with running_replicas(tmp_path, buckets=[SLOW], gossip_interval="1s") as cluster:
        _spend(cluster, "k1", 100, 40)
        # Hold r0's own pulls so that nothing heals before it is looked at.
        cluster[0].set_gossip_paused(True)

        await _corrupt(tmp_path, CorruptStateFault(path=str(cluster[0].state_path),
                                                   mode="set", value=0))  # fmt: skip

        assert cluster[0].tokens("k1") == 100.0  # read through: served at once
        cluster[0].set_gossip_paused(False)
        _eventually(lambda: cluster[0].metric("bucket_state_drift") > 0.3)
        cluster.wait_converged("k1", 100, target=0.0, timeout=10)
        assert cluster.tokens("k1") == [60.0, 60.0, 60.0]


async def test_raised_counters_spread_and_heal_as_the_window_moves(
    tmp_path: Path,
) -> None:
    """Test that counters set to the capacity limit everyone until they age out."""
    with running_replicas(tmp_path, buckets=[FAST], gossip_interval="0.2s") as cluster:
        _spend(cluster, "w1", 30, 3)

        await _corrupt(tmp_path, CorruptStateFault(path=str(cluster[0].state_path),
                                                   mode="set", value=30))  # fmt: skip

        assert cluster[0].tokens("w1") == 0.0
        _eventually(lambda: cluster.tokens("w1") == [0.0, 0.0, 0.0], timeout=4)
        healed_after = _eventually(
            lambda: cluster.tokens("w1") == [30.0, 30.0, 30.0], timeout=15
        )
        assert healed_after > 0.5


async def test_impossible_counters_are_counted_ignored_and_overwritten(
    tmp_path: Path,
) -> None:
    """Test that negative counters do not crash the replica and peers replace them."""
    with running_replicas(tmp_path, buckets=[SLOW], gossip_interval="1s") as cluster:
        _spend(cluster, "k1", 100, 40)
        cluster[0].set_gossip_paused(True)

        state = str(cluster[0].state_path)
        await _corrupt(tmp_path, CorruptStateFault(path=state, mode="scale", factor=-1))

        view = cluster[0].bucket("k1")
        assert view["corrupt_rows"] >= 1 and view["tokens"] == 100.0
        assert cluster[0].metric("bucket_corrupt_rows") >= 1
        assert cluster[0].metric("bucket_errors_total") >= 1
        assert cluster[0].take("k1")[0] == 200
        cluster[0].set_gossip_paused(False)
        _eventually(lambda: cluster[0].metric("bucket_corrupt_rows") == 0)
        cluster.wait_converged("k1", 100, target=0.0, timeout=10)
        assert cluster.tokens("k1") == [59.0, 59.0, 59.0]


async def test_restore_puts_the_served_tokens_back_without_gossip(
    tmp_path: Path,
) -> None:
    """Test that revert with restore undoes a corruption on a lone replica."""
    with running_replicas(tmp_path, count=1, buckets=[SLOW]) as cluster:
        cluster[0].take("k1", 25)
        fault = CorruptStateFault(
            path=str(cluster[0].state_path),
            mode="bitflip",
            bits=8,
            seed=4,
            restore=True,
        )
        driver, record = await _corrupt(tmp_path, fault)
        corrupted = cluster[0].bucket("k1")

        await driver.revert(record)

        assert (corrupted["tokens"], corrupted["corrupt_rows"]) != (75.0, 0)
        assert cluster[0].bucket("k1")["tokens"] == 75.0
        assert cluster[0].bucket("k1")["corrupt_rows"] == 0


async def test_pause_stops_a_replica_answering_and_revert_resumes_it(
    tmp_path: Path,
) -> None:
    """Test that a pause by pidfile silences the replica until revert."""
    with running_replicas(tmp_path, count=1) as cluster:
        driver = ProcessDriver(_context(tmp_path))
        fault = ProcessFault(action="pause", pidfile=str(cluster[0].pidfile))
        record = await driver.prepare("f1", fault)
        await driver.apply("f1", fault, record)

        paused_answers = cluster[0].answers(timeout=0.5)
        await driver.revert(record)

        assert not paused_answers
        assert cluster[0].answers(timeout=5)


OWNER = """
import asyncio, json, sys, time
from pathlib import Path
from chaos_agent.faults.base import FaultContext
from chaos_agent.faults.process import ProcessDriver
from chaos_agent.policy import Policy
from chaos_agent.wire import ProcessFault

async def main(pidfile, record_path):
    driver = ProcessDriver(FaultContext(policy=Policy(), state_dir=Path(".")))
    fault = ProcessFault(action="pause", pidfile=pidfile)
    record = await driver.prepare("f1", fault)
    Path(record_path).write_text(json.dumps(record))
    await driver.apply("f1", fault, record)
    Path(record_path + ".applied").touch()
    time.sleep(300)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

REVERTER = """
import asyncio, json, sys
from pathlib import Path
from chaos_agent.faults.base import FaultContext
from chaos_agent.faults.process import ProcessDriver
from chaos_agent.policy import Policy

driver = ProcessDriver(FaultContext(policy=Policy(), state_dir=Path(".")))
record = json.loads(Path(sys.argv[1]).read_text())
print(json.dumps(asyncio.run(driver.revert(record))))
"""


def test_a_pause_whose_owner_died_is_resumed_from_a_fresh_process(
    tmp_path: Path,
) -> None:
    """Test that revert(record) in a new process resumes a replica paused by a
    process that was SIGKILLed before it could revert."""
    record_path = tmp_path / "record.json"
    with running_replicas(tmp_path, count=1) as cluster:
        owner = subprocess.Popen(
            [sys.executable, "-c", OWNER, str(cluster[0].pidfile), str(record_path)]
        )
        try:
            _eventually(lambda: Path(f"{record_path}.applied").exists(), timeout=20)
        finally:
            owner.kill()
            owner.wait()
        assert not cluster[0].answers(timeout=0.5)

        reverted = subprocess.run(
            [sys.executable, "-c", REVERTER, str(record_path)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip

        # The driver logs to stdout too: the answer is the last line.
        answer = json.loads(reverted.stdout.strip().splitlines()[-1])
        assert answer["resumed"] == [cluster[0].pid]
        assert cluster[0].answers(timeout=5)


async def test_an_unreadable_state_file_is_moved_aside_and_refilled_by_peers(
    tmp_path: Path,
) -> None:
    """Test that a replica whose SQLite header was destroyed (bytes adapter)
    still starts, keeps the broken file aside, and gets its counters back."""
    with running_replicas(tmp_path, buckets=[SLOW]) as cluster:
        _spend(cluster, "k1", 100, 40)
        cluster[0].take("k1", 10)
        cluster.wait_converged("k1", 100, target=0.0, timeout=10)
        cluster[0].stop()
        header = CorruptStateFault(
            adapter="bytes", path=str(cluster[0].state_path),
            offset_start=0, offset_end=16, mode="set", value=0,
        )  # fmt: skip
        await _corrupt(tmp_path, header)

        cluster[0].start()
        cluster.wait_converged("k1", 100, target=0.0, timeout=10)

        assert cluster.tokens("k1") == [50.0, 50.0, 50.0]
        assert _files(tmp_path, "r0.db.corrupt-*")
        assert "state_file_unreadable" in cluster[0].log_path.read_text()
