"""Shared fixtures: real brokers on free loopback ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import Broker, running_broker


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
