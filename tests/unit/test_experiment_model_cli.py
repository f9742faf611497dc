"""`aftershock run` as a user meets it: bad files and unreachable brokers end
with exit 2 and a message that says what to fix, before anything is sent."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from coordinator.cli import app

GOOD = """\
name: tiny
system:
  endpoints: [{name: a, url: "http://127.0.0.1:9"}]
load: {rate: 10}
method:
  - name: p
    faults:
      - {type: cpu, params: {load_percent: 10}, duration: 1s}
"""


def test_bad_file_exits_2_naming_line_and_field(tmp_path: Path) -> None:
    """Test that an invalid experiment is refused with file:line: field."""
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("load_percent: 10", "load_percent: 0"))

    result = CliRunner().invoke(app, ["run", str(path)])

    assert result.exit_code == 2
    assert f"{path}:8: method[0].faults[0].params.load_percent" in result.output


def test_unreachable_broker_exits_2_with_json_outcome(tmp_path: Path) -> None:
    """Test that a run whose broker does not answer reports `failed` (exit 2)
    as JSON and still writes its report."""
    path = tmp_path / "tiny.yaml"
    path.write_text(GOOD)
    report = tmp_path / "report"

    argv = ["--broker", "mqtt://127.0.0.1:9", "run", str(path), "--json"]

    result = CliRunner().invoke(app, [*argv, "--report", str(report)])

    assert result.exit_code == 2
    outcome = json.loads(result.stdout)
    assert (outcome["outcome"], outcome["exit_code"]) == ("failed", 2)
    assert "cannot connect to the broker" in outcome["reason"]
    assert (report / "junit.xml").exists()


def test_dry_run_without_broker_exits_2(tmp_path: Path) -> None:
    """Test that --dry-run needs the live fleet and says so when it is not
    there, sending nothing."""
    path = tmp_path / "tiny.yaml"
    path.write_text(GOOD)

    result = CliRunner().invoke(
        app, ["--broker", "mqtt://127.0.0.1:9", "run", str(path), "--dry-run"]
    )

    assert result.exit_code == 2
    assert "cannot connect to the broker" in result.output
