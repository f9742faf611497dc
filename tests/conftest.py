"""Shared fixtures: real brokers on free loopback ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import residue
from tests.brokers import Broker, running_broker

_RESIDUE_KEY = pytest.StashKey[tuple[str, set[str]]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    # Root only: namespaces, links, nft tables and cgroups are root's.
    if os.geteuid() == 0:
        marker = residue.mark_session()
        session.stash[_RESIDUE_KEY] = (marker, residue.snapshot())


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the session if it left a process, namespace, link, nft table,
    agent qdisc or cgroup behind, whichever test passed."""
    if _RESIDUE_KEY not in session.stash:
        return
    marker, before = session.stash[_RESIDUE_KEY]
    left = residue.leftovers(before, marker)
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["the test session left these behind:", *(f"  {item}" for item in left)]
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line("\n".join(lines), red=True, bold=True)
    else:
        print("\n".join(lines))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    # Integration tests need root for namespaces, cgroups and netlink.
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (namespaces, cgroups, netlink)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    with running_broker("mosquitto", tmp_path) as broker:
        yield broker


@pytest.fixture
def embedded_broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker("embedded", tmp_path) as broker:
        yield broker


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """Each test using this runs once against Mosquitto and once against the
    embedded broker."""
    with running_broker(request.param, tmp_path) as broker:
        yield broker
