"""No shell anywhere in the agent: fault parameters come from the network,
and a shell would turn a field into a command line."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHELL = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|create_subprocess_shell")


def shell_calls(package: Path) -> list[str]:
    """`file:line: code` for every line of `package` that starts a shell."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if SHELL.search(line):
                where = path.relative_to(package.parent)
                found.append(f"{where}:{number}: {line.strip()}")
    return found


def test_agent_sources_start_no_shell() -> None:
    """Test that no agent module uses shell=True, os.system, os.popen or
    create_subprocess_shell (the failure names file and line)."""
    assert shell_calls(ROOT / "chaos_agent") == []


def test_scan_finds_a_shell_call(tmp_path: Path) -> None:
    """Test that the scan would catch each form, so the test above can fail."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "bad.py").write_text(
        "import os, subprocess, asyncio\n"
        "subprocess.run(cmd, shell=True)\n"
        "os.system(cmd)\n"
        "os.popen(cmd)\n"
        "asyncio.create_subprocess_shell(cmd)\n"
        "subprocess.run(['ls'])\n"
    )

    assert [hit.split(":")[1] for hit in shell_calls(package)] == ["2", "3", "4", "5"]
