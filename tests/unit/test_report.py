"""Report files from a synthetic run: present, well formed, and saying what
the run found."""

from __future__ import annotations

import base64
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from coordinator.analysis import (
    DriftSample,
    FaultWindow,
    Finding,
    Verdict,
)
from coordinator.experiment_cli import print_result
from coordinator.load import Clock, RequestRecord
from coordinator.report import (
    Journal,
    RunResult,
    TelemetryPoint,
    render_junit,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(outcome: str = "violated") -> RunResult:
    journal = Journal(Clock(), "demo")
    journal.record("run_started", rate=10)
    journal.record("fault_applied", fault="slow-a", nodes=["edge-1"])
    records = [
        RequestRecord(t / 10, "ab"[t % 2], "p1", "k", 200, 0.01 + (t % 7) / 100, None)
        for t in range(200)
    ]
    records.append(RequestRecord(5.0, "a", "p1", "k", 503, 0.02, None))
    return RunResult(
        experiment="demo",
        outcome=outcome,  # type: ignore[arg-type]
        started_at=1_800_000_000.0,
        duration_s=20.0,
        hypothesis={"p99_ms": 120, "error_rate_pct": 0.1, "drift_pct": 2},
        verdicts=[
            Verdict("p99 latency", 120, 70.0, "ms", True),
            Verdict("error rate", 0.1, 0.5, "%", False, "1 of 201 failed"),
            Verdict("drift after recovery", 2, 0.0, "%", True),
        ],
        findings=[
            Finding(
                "errors-under-resource-pressure", "5xx under <cpu>", slo="error rate"
            ),
            Finding("fault-skipped", "slow-b skipped", "note"),
        ],
        windows=[
            FaultWindow("squeeze", "p1", "cpu", 4, 8, ("edge-1",), ("a",)),
            FaultWindow("slow-b", "p1", "latency", 8, 8, skipped="no netem here"),
        ],
        records=records,
        drift=[DriftSample(t, "k", {"a": 5, "b": 5 + t % 3}, 100) for t in range(20)],
        telemetry=[TelemetryPoint(t, "edge-1", 30 + t, 40) for t in range(20)],
        events=journal.events,
        service={"a": {"allowed": 90, "limited": 10, "error": 1, "restarted": 0}},
    )


def test_every_file_is_written(tmp_path: Path) -> None:
    """Test that the report directory gets journal, requests, md, html, junit."""
    paths = write_report(_result(), tmp_path / "out")

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "journal.json",
        "junit.xml",
        "report.html",
        "report.md",
        "requests.csv",
    ]
    assert paths["html"].stat().st_size > 10_000


def test_journal_has_timed_events_and_verdicts(tmp_path: Path) -> None:
    """Test that the journal is JSON with each event's times and the verdicts."""
    paths = write_report(_result(), tmp_path)

    journal = json.loads(paths["journal"].read_text())

    assert [e["event"] for e in journal["events"]] == ["run_started", "fault_applied"]
    assert all(e["at"].endswith("+00:00") and e["t"] >= 0 for e in journal["events"])
    assert journal["exit_code"] == 1
    assert [v["held"] for v in journal["verdicts"]] == [True, False, True]
    assert journal["faults"][1]["skipped"] == "no netem here"


def test_html_embeds_four_png_plots(tmp_path: Path) -> None:
    """Test that the HTML inlines four real PNG images and escapes text."""
    paths = write_report(_result(), tmp_path)
    page = paths["html"].read_text()

    chunks = page.split("data:image/png;base64,")[1:]
    images = [base64.b64decode(chunk.split("'", 1)[0]) for chunk in chunks]

    assert len(images) == 4
    assert all(image.startswith(PNG_MAGIC) for image in images)
    assert "5xx under &lt;cpu&gt;" in page


def test_markdown_has_verdict_table_and_findings(tmp_path: Path) -> None:
    """Test that the Markdown report shows the violated SLO and the finding."""
    text = write_report(_result(), tmp_path)["markdown"].read_text()

    assert text.startswith("# demo: hypothesis violated")
    assert "| error rate | <= 0.1 % | 0.5 % | VIOLATED |" in text
    assert "- **errors-under-resource-pressure** (violation): 5xx under <cpu>" in text
    assert "| a | 90 | 10 | 1 | - | - | 0 |" in text


def test_requests_csv_has_one_line_per_request(tmp_path: Path) -> None:
    """Test that requests.csv lists every request after its header."""
    lines = write_report(_result(), tmp_path)["requests"].read_text().splitlines()

    assert lines[0] == "t,replica,phase,key,status,latency_ms,error"
    assert len(lines) == 202


def test_junit_fails_the_violated_slo_with_its_finding() -> None:
    """Test that JUnit has a case per SLO, the violated one failing with the
    finding's text, and the skipped fault as a skipped case."""
    suite = ET.fromstring(render_junit(_result()))

    cases = {c.get("name"): c for c in suite.iter("testcase")}
    failure = cases["error rate"].find("failure")

    assert suite.get("tests") == "4"
    assert (suite.get("failures"), suite.get("skipped")) == ("1", "1")
    assert failure is not None and failure.text == "5xx under <cpu>"
    assert cases["p99 latency"].find("failure") is None
    assert cases["slow-b"].find("skipped") is not None


def test_junit_marks_an_aborted_run() -> None:
    """Test that an aborted run adds a failing `run` case with the reason."""
    result = _result("aborted")
    result.reason = "aborted: error rate 9 % over 5 s"

    suite = ET.fromstring(render_junit(result))
    run = next(c for c in suite.iter("testcase") if c.get("name") == "run")
    failure = run.find("failure")

    assert failure is not None and "error rate 9 %" in (failure.get("message") or "")
    assert suite.get("failures") == "2"


def test_verdict_starts_on_its_own_line_after_the_live_view() -> None:
    """Test that, written to a pipe, the verdict table's title does not run on
    from the live view's last line (rich ends a non-terminal Live without a
    newline)."""
    console = Console(file=io.StringIO(), width=100, soft_wrap=True)
    with Live(Table("stage"), console=console):
        pass
    print_result(console, _result(), None)

    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert "demo: violated" in [line.strip() for line in lines]
