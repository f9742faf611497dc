"""The session's leak check (tests/residue.py) sees what it must see."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import residue

pytestmark = pytest.mark.root


def test_leftovers_name_a_namespace_and_a_process_until_they_are_gone() -> None:
    """Test that a namespace and a marked process made after the snapshot are
    reported, and that nothing is once both are removed."""
    marker = f"residue-test-{os.getpid()}"
    namespace = f"as-residue-{os.getpid()}"
    before = residue.snapshot()
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, residue.SESSION_MARKER: marker},
    )
    try:
        found = residue.leftovers(before, marker, grace_s=0)
    finally:
        sleeper.kill()
        sleeper.wait()
        subprocess.run(["ip", "netns", "delete", namespace], check=True)

    assert f"netns {namespace}" in found
    assert any(item.startswith(f"process {sleeper.pid}:") for item in found)
    assert residue.leftovers(before, marker, grace_s=0) == []
