"""The kernel tier runs only inside the QEMU guest that tests/kernel/run.sh
boots (its init sets AFTERSHOCK_IN_VM=1); anywhere else it is skipped."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if os.environ.get("AFTERSHOCK_IN_VM") == "1":
        return
    skip = pytest.mark.skip(reason="kernel tier: run it with `make test-kernel`")
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)
