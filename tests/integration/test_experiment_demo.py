"""`aftershock demo --quick` end to end: it runs, reports, and leaves nothing
behind (no namespace, no link, no process of its lab)."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.root]


def _leftovers(marker: str) -> list[str]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if marker in cmdline:
            found.append(f"{process.pid}: {cmdline[:120]}")
    return found


def test_quick_demo_runs_reports_and_cleans_up(tmp_path: Path) -> None:
    """Test that the quick game day ends with a verdict table, a report with
    every fault of the sequence, exit 0, and no lab left behind."""
    directory = tmp_path / "demo"
    argv = [sys.executable, "-m", "coordinator.cli", "demo", "--quick"]
    demo = subprocess.run(
        [*argv, "--report", str(directory)],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )

    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "drift after recovery" in demo.stdout
    journal = json.loads((directory / "report" / "journal.json").read_text())
    faults = {f["type"] for f in journal["faults"]}
    assert faults == {"latency", "cpu", "corrupt-state", "process"}
    assert journal["outcome"] in ("held", "violated", "aborted")
    ET.parse(directory / "report" / "junit.xml")

    tag = f"aftershock-demo-{_namespace_tag(directory)}"
    namespaces = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert tag not in namespaces
    assert _leftovers(str(directory)) == []


def _namespace_tag(directory: Path) -> str:
    """The namespace tag of this demo, read back from its experiment file."""
    text = (directory / "experiment.yaml").read_text()
    for line in text.splitlines():
        if "netns: aftershock-demo-" in line:
            return line.split("aftershock-demo-")[1].split("-")[0]
    return "none"
