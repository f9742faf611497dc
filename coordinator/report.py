"""What a run leaves behind: the journal, the reports and the JUnit file.

A report directory holds:

- `journal.json`: every event of the run with its run time and wall time,
  the faults' windows, the verdicts and the findings;
- `requests.csv`: one line per request the load sent;
- `report.md` and `report.html` (the latter with its plots embedded as PNG:
  latency over time with the fault windows shaded, error rate, drift, and the
  nodes' CPU and memory from the agents' telemetry);
- `junit.xml`: one test case per SLO, so a CI job fails on a violated
  hypothesis; the failure text is the findings that explain it.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import structlog

from coordinator import analysis
from coordinator.analysis import DriftSample, FaultWindow, Finding, Verdict
from coordinator.load import Clock, RequestRecord

log = structlog.get_logger("coordinator.report")

Outcome = Literal["held", "violated", "aborted", "failed"]

# Exit codes of `aftershock run`, from the design.
EXIT_CODES: Final[dict[Outcome, int]] = {
    "held": 0,
    "violated": 1,
    "aborted": 1,
    "failed": 2,
}


@dataclass(frozen=True)
class Event:
    """One journal entry: run time, wall time, what happened, its facts."""

    t: float
    at: str
    event: str
    fields: dict[str, Any]


class Journal:
    """Events of a run, in order, each also logged as a structlog event."""

    def __init__(self, clock: Clock, experiment: str) -> None:
        self.clock = clock
        self.events: list[Event] = []
        self.log = log.bind(experiment=experiment)

    def record(self, event: str, **fields: Any) -> Event:
        t = self.clock.now()
        at = datetime.fromtimestamp(self.clock.wall(t), UTC).isoformat()
        entry = Event(round(t, 4), at, event, fields)
        self.events.append(entry)
        self.log.info(event, t=round(t, 3), **fields)
        return entry


@dataclass(frozen=True)
class TelemetryPoint:
    """One node sample from an agent's telemetry, on the run clock."""

    t: float
    node: str
    cpu_percent: float
    memory_percent: float


@dataclass
class RunResult:
    """Everything a run established, for the reports and the exit code."""

    experiment: str
    outcome: Outcome
    started_at: float
    duration_s: float
    hypothesis: dict[str, float]
    verdicts: list[Verdict] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    windows: list[FaultWindow] = field(default_factory=list)
    records: list[RequestRecord] = field(default_factory=list)
    drift: list[DriftSample] = field(default_factory=list)
    telemetry: list[TelemetryPoint] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    description: str = ""
    reason: str = ""
    converge_s: float | None = None
    # Per replica: the service's own counters over the run (see probes).
    service: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.outcome]

    def summary(self) -> dict[str, Any]:
        """The machine-readable outcome, as `--json` prints it."""
        return {
            "experiment": self.experiment,
            "outcome": self.outcome,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "started_at": _iso(self.started_at),
            "duration_s": round(self.duration_s, 3),
            "requests": len(self.records),
            "converge_s": self.converge_s,
            "verdicts": [asdict(v) for v in self.verdicts],
            "findings": [asdict(f) for f in self.findings],
            "service": self.service,
        }


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat()


def write_report(result: RunResult, directory: Path) -> dict[str, Path]:
    """Write every report file into `directory` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "journal": directory / "journal.json",
        "requests": directory / "requests.csv",
        "markdown": directory / "report.md",
        "html": directory / "report.html",
        "junit": directory / "junit.xml",
    }
    paths["journal"].write_text(render_journal(result))
    _write_requests(result.records, paths["requests"])
    paths["markdown"].write_text(render_markdown(result))
    paths["html"].write_text(render_html(result, plots(result)))
    paths["junit"].write_bytes(render_junit(result))
    log.info("report_written", directory=str(directory), outcome=result.outcome)
    return paths


# -------------------------------------------------------------------- journal


def render_journal(result: RunResult) -> str:
    body = {
        **result.summary(),
        "hypothesis": result.hypothesis,
        "faults": [asdict(w) for w in result.windows],
        "events": [asdict(e) for e in result.events],
        "drift": [asdict(s) for s in result.drift],
    }
    return json.dumps(body, indent=2, default=str) + "\n"


def _write_requests(records: Sequence[RequestRecord], path: Path) -> None:
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(
            ["t", "replica", "phase", "key", "status", "latency_ms", "error"]
        )
        for r in sorted(records, key=lambda r: r.t):
            latency = f"{r.latency_s * 1000:.3f}"
            writer.writerow(
                [
                    f"{r.t:.4f}",
                    r.replica,
                    r.phase,
                    r.key,
                    r.status,
                    latency,
                    r.error or "",
                ]
            )


# ------------------------------------------------------------------- markdown

_HEADLINES: Final[dict[Outcome, str]] = {
    "held": "hypothesis held",
    "violated": "hypothesis violated",
    "aborted": "run aborted by a check",
    "failed": "run could not be carried out",
}


def _figure(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g} {unit}" if unit == "%" else f"{value:.1f} {unit}"


def _tables(result: RunResult) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's tables as (title, header, rows), shared by md and html."""
    verdicts = [
        [
            v.slo,
            f"<= {v.target:g} {v.unit}",
            _figure(v.observed, v.unit),
            "held" if v.held else "VIOLATED",
            v.detail,
        ]
        for v in result.verdicts
    ]
    faults = [
        [
            w.phase,
            w.name,
            w.type,
            ", ".join(w.nodes) or "-",
            f"{w.start:.1f}",
            "-" if w.end is None else f"{w.end:.1f}",
            w.skipped or "applied",
        ]
        for w in result.windows
    ]
    phases = [
        [
            name,
            str(b.requests),
            _figure(b.p99_ms, "ms"),
            _figure(b.error_rate * 100, "%"),
        ]
        for name, b in analysis.per_phase(result.records).items()
    ]
    replicas = [
        [
            name,
            str(b.requests),
            _figure(b.p99_ms, "ms"),
            _figure(b.error_rate * 100, "%"),
        ]
        for name, b in sorted(analysis.per_replica(result.records).items())
    ]
    split = ["requests", "p99", "errors"]
    columns = [
        "allowed",
        "limited",
        "error",
        "errors_total",
        "state_drift",
        "restarted",
    ]
    service = [
        [name, *(_count(figures.get(c)) for c in columns)]
        for name, figures in sorted(result.service.items())
    ]
    return [
        ("Verdicts", ["SLO", "target", "observed", "verdict", "detail"], verdicts),
        (
            "Faults",
            ["phase", "fault", "type", "nodes", "from s", "to s", "outcome"],
            faults,
        ),
        ("Per phase", ["phase", *split], phases),
        ("Per replica", ["replica", *split], replicas),
        (
            "Service metrics over the run (from /metrics)",
            ["replica", *columns],
            service,
        ),
    ]


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def render_markdown(result: RunResult) -> str:
    lines = [
        f"# {result.experiment}: {_HEADLINES[result.outcome]}",
        "",
        f"Started {_iso(result.started_at)}, ran {result.duration_s:.1f} s, "
        f"{len(result.records)} requests; exit code {result.exit_code}.",
    ]
    if result.description:
        lines += ["", result.description]
    if result.reason:
        lines += ["", f"**{result.reason}**"]
    if result.converge_s is not None:
        lines += [
            "",
            f"Drift converged {result.converge_s:.1f} s after the last revert.",
        ]

    lines += ["", "## Findings", ""]
    lines += [f"- **{f.kind}** ({f.severity}): {f.text}" for f in result.findings]
    if not result.findings:
        lines.append("- none")

    for title, header, rows in _tables(result):
        lines += [
            "",
            f"## {title}",
            "",
            _md_row(header),
            _md_row(["---"] * len(header)),
        ]
        lines += [_md_row(row) for row in rows]
    return "\n".join(lines) + "\n"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


# ----------------------------------------------------------------------- html


def render_html(result: RunResult, images: dict[str, bytes]) -> str:
    """The report as one self-contained HTML page, plots inlined as PNG."""
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(result.experiment)}: {e(_HEADLINES[result.outcome])}</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}"
        ".VIOLATED{color:#b00;font-weight:bold}.held{color:#070}</style></head><body>",
        f"<h1>{e(result.experiment)}: {e(_HEADLINES[result.outcome])}</h1>",
        f"<p>Started {e(_iso(result.started_at))}, ran {result.duration_s:.1f} s, "
        f"{len(result.records)} requests; exit code {result.exit_code}.</p>",
    ]
    if result.reason:
        parts.append(f"<p><strong>{e(result.reason)}</strong></p>")
    parts.append("<h2>Findings</h2><ul>")
    parts += [
        f"<li><b>{e(f.kind)}</b> ({e(f.severity)}): {e(f.text)}</li>"
        for f in result.findings
    ]
    parts.append("</ul>" if result.findings else "<li>none</li></ul>")

    for title, header, rows in _tables(result):
        parts.append(f"<h2>{e(title)}</h2><table><tr>")
        parts += [f"<th>{e(h)}</th>" for h in header]
        parts.append("</tr>")
        for row in rows:
            cells = "".join(f"<td class='{e(c)}'>{e(c)}</td>" for c in row)
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</table>")

    parts.append("<h2>Plots</h2>")
    for name, png in images.items():
        data = base64.b64encode(png).decode()
        image = f"<img alt='{e(name)}' src='data:image/png;base64,{data}'>"
        parts.append(f"<h3>{e(name)}</h3>{image}")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def plots(result: RunResult) -> dict[str, bytes]:
    """PNG plots of the run: latency, error rate, drift, node CPU/memory."""
    # Imported here: matplotlib takes a second to load and only reports need it.
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figures: dict[str, bytes] = {}
    started = time.monotonic()
    for name, draw in (
        ("latency p99 per second", _plot_latency),
        ("error rate per second", _plot_errors),
        ("drift between replicas", _plot_drift),
        ("node CPU and memory", _plot_nodes),
    ):
        figure, axes = pyplot.subplots(figsize=(9, 3))
        draw(axes, result)
        for window in result.windows:
            if window.skipped is None:
                end = window.end if window.end is not None else result.duration_s
                axes.axvspan(window.start, end, color="tab:red", alpha=0.12)
                axes.annotate(
                    window.name,
                    (window.start, 1.0),
                    xycoords=("data", "axes fraction"),
                    fontsize=7,
                    va="top",
                    rotation=90,
                )
        axes.set_xlabel("run time (s); shaded: faults active")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=80)
        pyplot.close(figure)
        figures[name] = buffer.getvalue()
    log.debug("plots_drawn", seconds=round(time.monotonic() - started, 2))
    return figures


def _plot_latency(axes: Any, result: RunResult) -> None:
    for replica, records in sorted(
        analysis.group_by(result.records, lambda r: r.replica).items()
    ):
        rows = [(t, p) for t, p, _, _ in analysis.series(records) if p is not None]
        axes.plot([t for t, _ in rows], [p for _, p in rows], label=replica)
    axes.axhline(
        result.hypothesis.get("p99_ms", 0), color="black", linestyle="--", linewidth=1
    )
    axes.set_ylabel("p99 (ms)")
    if result.records:
        axes.legend(loc="upper right", fontsize="small")


def _plot_errors(axes: Any, result: RunResult) -> None:
    rows = analysis.series(result.records)
    axes.plot(
        [t for t, *_ in rows], [rate * 100 for _, _, rate, _ in rows], color="tab:red"
    )
    axes.axhline(
        result.hypothesis.get("error_rate_pct", 0),
        color="black",
        linestyle="--",
        linewidth=1,
    )
    axes.set_ylabel("errors (%)")


def _plot_drift(axes: Any, result: RunResult) -> None:
    rows = analysis.drift_series(result.drift)
    axes.plot(
        [t for t, _ in rows], [d * 100 for _, d in rows], marker=".", color="tab:purple"
    )
    axes.axhline(
        result.hypothesis.get("drift_pct", 0),
        color="black",
        linestyle="--",
        linewidth=1,
    )
    axes.set_ylabel("drift (% of capacity)")


def _plot_nodes(axes: Any, result: RunResult) -> None:
    nodes = sorted({p.node for p in result.telemetry})
    for node in nodes:
        points = [p for p in result.telemetry if p.node == node]
        axes.plot(
            [p.t for p in points], [p.cpu_percent for p in points], label=f"{node} cpu"
        )
        axes.plot(
            [p.t for p in points],
            [p.memory_percent for p in points],
            linestyle=":",
            label=f"{node} mem",
        )
    if nodes:
        axes.legend(loc="upper right", fontsize="small", ncol=2)
    else:
        axes.text(
            0.5, 0.5, "no telemetry received", ha="center", transform=axes.transAxes
        )
    axes.set_ylabel("%")


# ---------------------------------------------------------------------- junit


def render_junit(result: RunResult) -> bytes:
    """JUnit XML: one test case per SLO; a violated one fails with the
    findings that explain it; an aborted or failed run adds a failing case."""
    suite = ET.Element(
        "testsuite",
        name=f"aftershock.{result.experiment}",
        timestamp=_iso(result.started_at),
        time=f"{result.duration_s:.3f}",
    )
    failures = errors = skipped = 0
    for verdict in result.verdicts:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"aftershock.{result.experiment}",
            name=verdict.slo,
        )
        if verdict.held:
            continue
        failures += 1
        explained = [
            f.text
            for f in result.findings
            if f.slo == verdict.slo and f.severity == "violation"
        ]
        observed = _figure(verdict.observed, verdict.unit)
        message = (
            f"{verdict.slo} {observed} over target {verdict.target:g} {verdict.unit}"
        )
        failure = ET.SubElement(case, "failure", message=message, type="SloViolated")
        failure.text = "\n".join(explained) or verdict.detail

    if result.outcome in ("aborted", "failed"):
        case = ET.SubElement(
            suite, "testcase", classname=f"aftershock.{result.experiment}", name="run"
        )
        kind = "failure" if result.outcome == "aborted" else "error"
        ET.SubElement(
            case, kind, message=result.reason or result.outcome, type=result.outcome
        )
        failures += kind == "failure"
        errors += kind == "error"

    for window in result.windows:
        if window.skipped:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"aftershock.{result.experiment}.faults",
                name=window.name,
            )
            ET.SubElement(case, "skipped", message=window.skipped)
            skipped += 1

    suite.set("tests", str(len(suite)))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suite.set("skipped", str(skipped))
    ET.indent(suite)
    text: bytes = ET.tostring(suite, encoding="utf-8", xml_declaration=True)
    return text + b"\n"
