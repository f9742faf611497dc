"""The session's leak check (tests/residue.py) sees what it must see."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import residue

pytestmark = pytest.mark.root


def test_leftovers_name_what_the_session_made_until_it_is_gone() -> None:
    """Test that a namespace, a veth pair with an agent-handle qdisc, an nft
    table and a marked process made after the snapshot are reported, and that
    nothing is once they are removed."""
    marker = f"residue-test-{os.getpid()}"
    namespace = f"as-residue-{os.getpid()}"
    link = f"asres{os.getpid() % 10000}"
    table = f"aftershock_residue_{os.getpid()}"
    before = residue.snapshot()
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    subprocess.run(
        ["ip", "link", "add", link, "type", "veth", "peer", "name", f"{link}p"],
        check=True,
    )
    subprocess.run(
        ["tc", "qdisc", "add", "dev", link, "root", "handle", "a5f0:", "htb"],
        check=True,
    )
    subprocess.run(["nft", "add", "table", "ip", table], check=True)
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
        subprocess.run(["ip", "link", "delete", link], check=True)
        subprocess.run(["nft", "delete", "table", "ip", table], check=True)

    assert f"netns {namespace}" in found
    assert f"link {link}" in found
    assert f"qdisc htb a5f0: dev {link}" in found
    assert f"nft table ip {table}" in found
    assert any(item.startswith(f"process {sleeper.pid}:") for item in found)
    assert residue.leftovers(before, marker, grace_s=0) == []
