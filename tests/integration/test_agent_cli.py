"""The `chaos-agent` command line as a subprocess: check, and bad settings."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from chaos_agent.faults import DRIVERS

pytestmark = [pytest.mark.integration]


def chaos_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chaos_agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_check_json_reports_every_fault_type() -> None:
    """Test that `check --json` names the cgroup version and answers, for
    every registered fault type, whether it is available and why not."""
    result = chaos_agent("check", "--json")

    report = json.loads(result.stdout)
    assert report["cgroup"]["version"] in ("v1", "v2", "none")
    assert report["cpus"] >= 1
    assert set(report["faults"]) == set(DRIVERS)
    for fault in report["faults"].values():
        assert fault["ok"] or fault["reason"]
    expected = 0 if report["capabilities"]["faults"] else 1
    assert result.returncode == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--broker", "http://x:1"], "mqtt://HOST:PORT"),
        (["--node", "bad name!"], "node"),
        (["--label", "novalue"], "KEY=VALUE"),
        (["--metrics-listen", "nowhere"], "HOST:PORT"),
        (["--trust", "/nonexistent/coordinator.pub"], "coordinator.pub"),
        ([], "--insecure-allow-unsigned"),
        (["--insecure-allow-unsigned", "--ca", "/etc/ca.crt"], "use mqtts://"),
    ],
    ids=["scheme", "node", "label", "listen", "trust", "no-trust", "tls-plain"],
)
def test_bad_settings_exit_2_with_reason(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """Test that invalid settings stop the agent before it starts, with exit
    code 2 and a message naming the problem."""
    base = ["run", "--node", "n1", "--state-dir", str(tmp_path)]

    result = chaos_agent(*base, *args)

    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.root
def test_metrics_port_taken_exits_2_with_reason(tmp_path: Path) -> None:
    """Test that an agent whose /metrics port is already taken stops with exit
    code 2 and one line naming the address and the way out, not a
    traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"

        result = chaos_agent(
            "run", "--node", "n1", "--state-dir", str(tmp_path),
            "--insecure-allow-unsigned", "--broker", "mqtt://127.0.0.1:9",
            "--metrics-listen", address,
        )  # fmt: skip

    assert result.returncode == 2
    assert f"cannot serve /metrics on {address}" in result.stderr
    assert "Traceback" not in result.stderr
