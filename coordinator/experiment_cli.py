"""`aftershock run` and `aftershock demo`: experiments from the command line.

`run_command` and `demo_command` register on the `aftershock` app when
`coordinator.cli` imports this module; the global options (`--broker`,
`--username`, `--password`, `--json`) come from there.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from coordinator.cli import app, cli_state
from coordinator.commands import Coordinator
from coordinator.experiment import (
    Experiment,
    ExperimentError,
    Hypothesis,
    Progress,
    RunFailed,
    load_experiment,
    plan_experiment,
    run_experiment,
)
from coordinator.mqtt import BrokerUnreachable, BrokerUrlError, Connector
from coordinator.report import RunResult


def _default_report_dir(name: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path("aftershock-reports") / f"{name}-{stamp}"


def run_command(
    ctx: typer.Context,
    experiment_file: Annotated[
        Path,
        typer.Argument(
            metavar="EXPERIMENT.yaml", help="The experiment to run (see examples/)."
        ),
    ],
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Directory for journal.json, report.md, report.html, junit.xml "
            "and requests.csv; default aftershock-reports/NAME-TIMESTAMP.",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the file and resolve every fault's targets against the "
            "live fleet; inject nothing.",
        ),
    ] = False,
    json_flag: Annotated[
        bool, typer.Option("--json", help="Print the outcome as JSON, no live view.")
    ] = False,
) -> None:
    """Run an experiment: steady state, faults, recovery, verdict, report.

    Every fault is reverted at the end, on abort, on error and on Ctrl-C;
    should this process die, the agents revert on their own once the lease
    (the experiment's `lease`, 15 s by default) runs out.

    Exit codes: 0 the hypothesis held, 1 it was violated or an abort
    condition stopped the run, 2 the run could not be carried out (bad file,
    no broker, no agent, halted fleet, steady state already broken).
    """
    state = cli_state(ctx, json_flag)
    json_output = state.json
    console = Console(stderr=json_output, soft_wrap=True)
    try:
        experiment = load_experiment(experiment_file)
        connector = state.connector()
    except (ExperimentError, BrokerUrlError) as exc:
        console.print(Text(str(exc), style="red"))
        raise typer.Exit(2) from None
    signer = state.deps.signer

    if dry_run:
        raise typer.Exit(_dry_run(experiment, connector, console, json_output))

    directory = report or _default_report_dir(experiment.name)
    if json_output:
        result = asyncio.run(
            run_experiment(experiment, connector, report_dir=directory, signer=signer)
        )
        print(json.dumps({**result.summary(), "report": str(directory)}, indent=2))
        raise typer.Exit(result.exit_code)

    view = _LiveView(experiment)
    try:
        with Live(view.render(), console=console, refresh_per_second=4) as live:
            show = view.follower(live, console)
            result = asyncio.run(
                run_experiment(
                    experiment,
                    connector,
                    report_dir=directory,
                    signer=signer,
                    progress=show,
                )
            )
    except KeyboardInterrupt:
        console.print(f"interrupted; faults reverted; report: {directory}")
        raise typer.Exit(1) from None
    print_result(console, result, directory)
    raise typer.Exit(result.exit_code)


def _dry_run(
    experiment: Experiment,
    connector: Connector,
    console: Console,
    json_output: bool,
) -> int:
    async def plan() -> list[Any]:
        async with (
            connector() as transport,
            Coordinator(transport) as coordinator,
        ):
            return plan_experiment(experiment, await coordinator.snapshot())

    try:
        planned = asyncio.run(plan())
    except (BrokerUnreachable, RunFailed) as exc:
        console.print(Text(f"{experiment.name}: {exc}", style="red"))
        return 2

    if json_output:
        print(json.dumps([vars(p) for p in planned], indent=2))
        return 0
    table = Table(title=f"{experiment.name}: dry run, nothing injected")
    for column in ("phase", "fault", "type", "duration", "nodes"):
        table.add_column(column)
    for p in planned:
        where = ", ".join(p.nodes) if not p.skipped else f"[yellow]skip: {p.skipped}"
        table.add_row(p.phase, p.name, p.type, f"{p.duration_s:g}s", where)
    console.print(table)
    return 0


class _LiveView:
    """The terminal view while a run goes: stage, load figures, faults."""

    def __init__(self, experiment: Experiment | None) -> None:
        self.experiment = experiment
        self.latest: Progress | None = None

    def follower(self, live: Live, console: Console) -> Callable[[Progress], None]:
        """The progress callback: redraw the live table, and where the output
        is not a terminal (CI logs, pipes), which see only the last frame,
        also print one line each time the stage or the active faults change."""

        def show(progress: Progress) -> None:
            before = self.latest
            entered = before is None or (before.stage, before.active_faults) != (
                progress.stage,
                progress.active_faults,
            )
            self.latest = progress
            live.update(self.render())
            if entered and not console.is_terminal:
                faults = ", ".join(progress.active_faults) or "no faults"
                console.print(f"{progress.t:6.1f}s  {progress.stage}  ({faults})")

        return show

    def render(self) -> Table:
        name = self.experiment.name if self.experiment else "game-day"
        table = Table(title=f"aftershock run {name}", min_width=60)
        table.add_column("stage")
        table.add_column("t", justify="right")
        table.add_column("requests", justify="right")
        table.add_column("p99", justify="right")
        table.add_column("errors", justify="right")
        table.add_column("drift", justify="right")
        table.add_column("active faults")
        p = self.latest
        if p is None:
            table.add_row("starting", "", "", "", "", "", "")
            return table
        hypothesis = self.experiment.hypothesis if self.experiment else Hypothesis()
        p99 = "-" if p.p99_ms is None else f"{p.p99_ms:.0f} ms"
        drift = "-" if p.drift_pct is None else f"{p.drift_pct:.1f} %"
        table.add_row(
            p.stage,
            f"{p.t:.0f}s",
            str(p.requests),
            Text(p99, style="red" if (p.p99_ms or 0) > hypothesis.p99_ms else ""),
            Text(
                f"{p.error_rate_pct:.2f} %",
                style="red" if p.error_rate_pct > hypothesis.error_rate_pct else "",
            ),
            drift,
            ", ".join(p.active_faults) or "-",
        )
        return table


def print_result(console: Console, result: RunResult, directory: Path | None) -> None:
    """The verdict table, the findings and where the report is, below the
    live view."""
    if not console.is_terminal:
        # Written to a file or a pipe, the live view ends without a newline.
        console.line()
    styles = {"held": "green", "violated": "red", "aborted": "red", "failed": "yellow"}
    table = Table(title=f"{result.experiment}: {result.outcome}")
    for column in ("SLO", "target", "observed", "verdict"):
        table.add_column(column)
    for v in result.verdicts:
        observed = "n/a" if v.observed is None else f"{v.observed:.3g} {v.unit}"
        verdict = Text("held", "green") if v.held else Text("VIOLATED", "bold red")
        table.add_row(v.slo, f"<= {v.target:g} {v.unit}", observed, verdict)
    if result.verdicts:
        console.print(table)
    else:
        console.print(
            Text(f"{result.experiment}: {result.outcome}", styles[result.outcome])
        )
    if result.reason:
        console.print(Text(result.reason, style=styles[result.outcome]))
    for finding in result.findings:
        mark = "!" if finding.severity == "violation" else "-"
        console.print(f" {mark} [bold]{finding.kind}[/bold]: {finding.text}")
    if directory is not None:
        console.print(f"report: {directory / 'report.html'} (exit {result.exit_code})")


def demo_command(
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Directory for the lab's logs and the report; default "
            "aftershock-reports/game-day-TIMESTAMP.",
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Fault durations cut to a fifth: about a minute in all."
        ),
    ] = False,
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="Plain local processes even as root (no network namespaces); "
            "faults that need privileges are then skipped.",
        ),
    ] = False,
) -> None:
    """A local game day: broker, three nodes (network namespaces as root),
    each with a token-bucket replica and an agent, load, and the classic
    sequence: 200 ms latency on one replica, CPU pressure, corrupted bucket
    state, a replica killed and restarted. Ends with the verdict table and
    the report's path; under five minutes (about one with --quick).

    Exits 0 when the game day ran (whatever its verdict), 2 when the lab
    could not be set up.
    """
    from coordinator.demo import DemoError, run_demo

    directory = (report or _default_report_dir("game-day")).resolve()
    console = Console(soft_wrap=True)
    view = _LiveView(None)
    try:
        with Live(view.render(), console=console, refresh_per_second=4) as live:
            show = view.follower(live, console)
            result = asyncio.run(
                run_demo(
                    directory,
                    quick=quick,
                    isolated=False if local else None,
                    progress=show,
                )
            )
    except DemoError as exc:
        console.print(Text(f"the demo could not start: {exc}", style="red"))
        raise typer.Exit(2) from None
    print_result(console, result, directory / "report")
    console.print(f"lab logs and experiment.yaml: {directory}")
    raise typer.Exit(2 if result.outcome == "failed" else 0)


app.command("run")(run_command)
app.command("demo")(demo_command)
