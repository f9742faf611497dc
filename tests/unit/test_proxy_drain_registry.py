"""The proxy engine's registry of draining reverts, across event loops.

A reverted proxy fault whose connections are still open is drained by a task
kept in a module-level registry. These tests pin down that an entry never
outlives its task's chances to run: after a cancelled clean-up, or when the
loop that ran the task has closed (the test suite runs one loop per test,
and a leftover once broke every later `shutdown`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chaos_agent.faults import proxy_engine
from chaos_agent.faults.base import FaultContext
from chaos_agent.policy import Policy

TABLE = proxy_engine.table_name("fault-drain")


class StubProxy:
    """Just what `_drain` uses of a DelayProxy: connections never drain."""

    def __init__(self) -> None:
        self.aborted = 0

    async def drained(self) -> None:
        await asyncio.Event().wait()

    async def abort(self) -> None:
        self.aborted += 1


@pytest.fixture(autouse=True)
def empty_registry() -> Iterator[None]:
    proxy_engine._DRAINING.clear()
    yield
    proxy_engine._DRAINING.clear()


def start_drain(proxy: StubProxy) -> asyncio.Task[None]:
    task = asyncio.create_task(
        proxy_engine._drain(proxy, None, TABLE)  # type: ignore[arg-type]
    )
    proxy_engine._DRAINING[TABLE] = task
    return task


def test_shutdown_forgets_drains_of_a_closed_loop() -> None:
    """Test that `shutdown` in a new loop ignores a drain task whose loop
    closed (finished but still registered, or never finished), instead of
    raising "Event loop is closed" or awaiting a task that cannot run."""

    async def leave_entries() -> None:
        finished = asyncio.create_task(asyncio.sleep(0))
        await finished
        proxy_engine._DRAINING["aftershock_px_finished"] = finished
        never = asyncio.create_task(asyncio.sleep(3600))
        proxy_engine._DRAINING["aftershock_px_pending"] = never

    old_loop = asyncio.new_event_loop()
    old_loop.run_until_complete(leave_entries())
    old_loop.close()

    asyncio.run(asyncio.wait_for(proxy_engine.shutdown(), 5))

    assert proxy_engine._DRAINING == {}


def test_revert_ignores_a_drain_of_a_closed_loop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Test that a leftover entry from another loop does not make revert
    answer "already gone": it deletes the table as for any fresh revert."""
    other = asyncio.new_event_loop()
    proxy_engine._DRAINING[TABLE] = other.create_task(asyncio.sleep(0))
    other.run_until_complete(asyncio.sleep(0))
    other.close()
    deleted: list[str] = []

    async def delete_table(netns: Path | None, table: str) -> bool:
        deleted.append(table)
        return True

    monkeypatch.setattr(proxy_engine, "_delete_table", delete_table)
    engine = proxy_engine.ProxyEngine(FaultContext(policy=Policy(), state_dir=tmp_path))

    detail = asyncio.run(engine.revert({"engine": "proxy", "table": TABLE}))

    assert deleted == [TABLE]
    assert not detail.get("already_gone")


async def test_shutdown_cuts_a_drain_and_unregisters_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that shutdown ends a drain that would wait for its grace period:
    connections aborted, table deleted, entry gone."""
    deleted: list[str] = []

    async def delete_table(netns: Path | None, table: str) -> bool:
        deleted.append(table)
        return True

    monkeypatch.setattr(proxy_engine, "_delete_table", delete_table)
    proxy = StubProxy()
    start_drain(proxy)
    await asyncio.sleep(0)

    await asyncio.wait_for(proxy_engine.shutdown(), 5)

    assert (proxy.aborted, deleted) == (1, [TABLE])
    assert proxy_engine._DRAINING == {}


async def test_a_cancelled_clean_up_still_unregisters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that a drain cancelled again while deleting its table (as when
    its loop shuts down during `shutdown`) leaves no registry entry behind."""
    deleting = asyncio.Event()

    async def slow_delete(netns: Path | None, table: str) -> Any:
        deleting.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(proxy_engine, "_delete_table", slow_delete)
    task = start_drain(StubProxy())
    await asyncio.sleep(0)

    task.cancel()
    await asyncio.wait_for(deleting.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    assert task.cancelled()
    assert proxy_engine._DRAINING == {}
