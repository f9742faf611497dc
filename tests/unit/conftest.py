"""Fixtures of the agent's unit tests: a fake node and clock, and an agent
started on them (its start-up messages drained). A test module may override
any of them, as the signing tests do for `agent`."""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos_agent.agent import Agent
from tests.unit.agent_fakes import FakeClock, FakeNode, make_agent


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def node() -> FakeNode:
    return FakeNode()


@pytest.fixture
async def agent(tmp_path: Path, node: FakeNode, clock: FakeClock) -> Agent:
    agent = make_agent(tmp_path, node, clock)
    await agent.start()
    agent.outbox.drain()
    return agent
