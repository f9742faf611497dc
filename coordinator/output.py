"""What the CLI prints: rich tables for people, JSON records for scripts.

The record functions are the JSON contract (see docs/cli.md); the tables show
the same records. Errors and progress go to stderr, so stdout carries only
the result and `--json` output can be piped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from chaos_agent import wire
from coordinator.commands import InjectPlan, NodeResult
from coordinator.fleet import AgentView
from coordinator.units import format_duration

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

_STATE_STYLE = {
    "applied": "green",
    "reverted": "green",
    "rejected": "yellow",
    "failed": "red",
    "timeout": "red",
}


def print_json(value: Any) -> None:
    """One JSON document on stdout, written plainly so pipes get it whole."""
    sys.stdout.write(json.dumps(value, default=str) + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    """The one-line reason a command failed, on stderr."""
    stderr.print(f"aftershock: {message}", markup=False)


def seconds_until(moment: datetime, now: datetime) -> float:
    return round((moment - now).total_seconds(), 3)


def _left(moment: datetime, now: datetime) -> float:
    return max(0.0, seconds_until(moment, now))


# ------------------------------------------------------------------- agents


def fault_record(
    agent: AgentView, fault: wire.ActiveFault, now: datetime
) -> dict[str, Any]:
    return {
        "node": agent.node,
        "site": agent.site,
        "online": agent.online,
        "fault_id": str(fault.fault_id),
        "type": fault.type,
        "experiment": fault.experiment,
        "applied_at": fault.applied_at.isoformat(),
        "expires_in_s": seconds_until(fault.expires_at, now),
        "lease_expires_in_s": seconds_until(fault.lease_expires_at, now),
        "detail": fault.detail,
    }


def agent_record(agent: AgentView, now: datetime) -> dict[str, Any]:
    status = agent.status
    return {
        "node": agent.node,
        "site": agent.site,
        "online": agent.online,
        "version": status.version,
        "labels": dict(status.labels),
        "capabilities": status.capabilities.model_dump(mode="json"),
        "faults": [fault_record(agent, f, now) for f in status.faults],
        "halted": status.halted,
        "halt_reason": status.halt_reason,
        "status_at": status.at.isoformat(),
    }


def agents_table(agents: Iterable[AgentView], now: datetime) -> Table:
    table = Table(title="agents", title_justify="left")
    for column in ("node", "site", "online", "labels", "capabilities", "faults"):
        table.add_column(column)
    for agent in agents:
        capabilities = agent.status.capabilities
        can = ", ".join(capabilities.faults) or "-"
        cannot = ", ".join(sorted(capabilities.missing))
        faults = ", ".join(
            f"{f.type} ({format_duration(_left(f.expires_at, now))} left)"
            for f in agent.status.faults
        )
        online = "[green]yes[/]" if agent.online else "[red]no[/]"
        if agent.status.halted:
            online += " [yellow](halted)[/]"
        table.add_row(
            agent.node,
            agent.site,
            online,
            " ".join(f"{k}={v}" for k, v in sorted(agent.labels.items())) or "-",
            can + (f" [dim](not: {cannot})[/]" if cannot else ""),
            faults or "-",
        )
    return table


def faults_table(records: list[dict[str, Any]]) -> Table:
    table = Table(title="active faults", title_justify="left")
    for column in ("node", "site", "type", "experiment", "expires in", "fault id"):
        table.add_column(column)
    for record in records:
        table.add_row(
            record["node"],
            record["site"],
            record["type"],
            record["experiment"],
            format_duration(max(0.0, record["expires_in_s"])),
            record["fault_id"],
        )
    return table


# ------------------------------------------------------------------- inject


def plan_record(plan: InjectPlan) -> dict[str, Any]:
    return {
        "dry_run": True,
        "command_id": plan.fault_id,
        "targets": [{"node": a.node, "site": a.site} for a in plan.targets],
        "command": plan.command.model_dump(mode="json"),
    }


def result_record(result: NodeResult) -> dict[str, Any]:
    return {
        "node": result.node,
        "site": result.site,
        "state": result.state,
        "reason": result.reason,
        "revert_state": result.revert_state,
        "revert_cause": result.revert_cause,
        "applied_ms": result.applied_ms,
        "detail": result.detail,
    }


def inject_record(
    plan: InjectPlan, results: Iterable[NodeResult], *, detached: bool
) -> dict[str, Any]:
    fault = plan.command.fault
    return {
        "command_id": plan.fault_id,
        "experiment": plan.command.experiment,
        "type": fault.type if fault else None,
        "duration_s": plan.duration_s,
        "lease_s": plan.lease_s,
        "detached": detached,
        "results": [result_record(r) for r in results],
    }


def results_table(plan: InjectPlan, results: Iterable[NodeResult]) -> Table:
    fault = plan.command.fault
    title = f"{fault.type if fault else 'command'} {plan.fault_id}"
    table = Table(title=title, title_justify="left")
    for column in ("node", "site", "state", "reverted", "reason"):
        table.add_column(column)
    for result in results:
        style = _STATE_STYLE.get(result.state, "")
        reverted: str = result.revert_state or "-"
        if result.revert_cause:
            reverted += f" ({result.revert_cause})"
        table.add_row(
            result.node,
            result.site,
            f"[{style}]{result.state}[/]" if style else result.state,
            reverted,
            result.reason or "",
        )
    return table


def plan_table(plan: InjectPlan) -> Table:
    table = Table(title=f"dry run: would send {plan.fault_id}", title_justify="left")
    table.add_column("node")
    table.add_column("site")
    table.add_column("topic")
    for agent in plan.targets:
        table.add_row(
            agent.node, agent.site, wire.command_topic(agent.site, agent.node)
        )
    return table


# ---------------------------------------------------------------- telemetry


def telemetry_record(sample: wire.Telemetry) -> dict[str, Any]:
    return sample.model_dump(mode="json")


def telemetry_table(samples: Iterable[wire.Telemetry]) -> Table:
    table = Table(title="telemetry", title_justify="left")
    for column in ("node", "site", "cpu %", "load1", "memory %", "faults", "at"):
        table.add_column(column, justify="right" if "%" in column else "left")
    for sample in samples:
        table.add_row(
            sample.node,
            sample.site,
            f"{sample.cpu_percent:.1f}",
            f"{sample.load1:.2f}",
            f"{sample.memory_percent:.1f}",
            str(sample.faults_active),
            sample.at.strftime("%H:%M:%S"),
        )
    return table
