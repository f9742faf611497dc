"""`chaos-agent`: the node daemon (`run`) and its capability report (`check`)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

if sys.argv[1:2] == ["run"] and not {"--help", "-h"} & set(sys.argv):
    # The long-running daemon does without rich (~4 MB resident): structlog
    # and typer import it whenever it is installed, for pretty tracebacks and
    # help the daemon never shows, and fall back to plain output without it.
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]

import typer
from pydantic import ValidationError

from chaos_agent import __version__, logs
from chaos_agent.journal import JournalError
from chaos_agent.settings import (
    DEFAULT_METRICS_LISTEN,
    AgentSettings,
    SettingsError,
    parse_label,
)
from chaos_agent.wire import WireError

app = typer.Typer(
    name="chaos-agent",
    help=(
        "Aftershock node agent: applies faults on command from the coordinator "
        "over MQTT, and always reverts them (duration, lease, halt, journal, "
        "SIGTERM)."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

ENV = "Also CHAOS_AGENT_{}."


def _settings(flags: dict[str, Any]) -> AgentSettings:
    """Flags given on the command line, over environment, over the file."""
    given = {name: value for name, value in flags.items() if value is not None}
    try:
        return AgentSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        _fail(f"invalid settings: {problems}")
    except SettingsError as exc:
        _fail(str(exc))


def _fail(message: str) -> NoReturn:
    try:
        from rich.console import Console
    except ImportError:  # `run` keeps rich out (see the top of this module)
        typer.echo(f"error: {message}", err=True)
    else:
        Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


@app.command()
def run(
    broker: Annotated[
        str | None,
        typer.Option(
            help="MQTT broker: mqtts://HOST:PORT (TLS, port 8883 by default) or "
            "mqtt://HOST:PORT (plain, trusted networks only). " + ENV.format("BROKER")
        ),
    ] = None,
    node: Annotated[
        str | None,
        typer.Option(
            help="This node's name (unique in its site). " + ENV.format("NODE")
        ),
    ] = None,
    site: Annotated[
        str | None,
        typer.Option(
            help="Site (cluster) name; default 'default'. " + ENV.format("SITE")
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=VALUE label that commands can select on; repeatable. "
            'Also CHAOS_AGENT_LABELS=\'{"k": "v"}\'.'
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the journal and the halt memory live (must survive "
            "restarts); default /var/lib/aftershock. " + ENV.format("STATE_DIR")
        ),
    ] = None,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT for /metrics and /healthz; default "
            f"{DEFAULT_METRICS_LISTEN}, '' turns it off. "
            + ENV.format("METRICS_LISTEN")
        ),
    ] = None,
    telemetry_interval: Annotated[
        float | None,
        typer.Option(
            help="Seconds between telemetry samples; default 5. "
            + ENV.format("TELEMETRY_INTERVAL_S")
        ),
    ] = None,
    username: Annotated[
        str | None, typer.Option(help="Broker user name. " + ENV.format("USERNAME"))
    ] = None,
    password: Annotated[
        str | None,
        typer.Option(
            help="Broker password; prefer the environment, which `ps` does not "
            "show. " + ENV.format("PASSWORD")
        ),
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option(
            help="CA certificate (PEM) that signed the broker's certificate; "
            "default: the system store. mqtts:// only. " + ENV.format("CA")
        ),
    ] = None,
    cert: Annotated[
        Path | None,
        typer.Option(
            help="This agent's client certificate (PEM) for mutual TLS; its CN "
            "must be the node name the broker ACL expects. " + ENV.format("CERT")
        ),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option(
            help="Private key (PEM) of --cert. " + ENV.format("KEY"),
        ),
    ] = None,
    trust: Annotated[
        list[Path] | None,
        typer.Option(
            help="Public key (.pub) of a coordinator whose signed commands this "
            "agent accepts; repeatable; required unless "
            "--insecure-allow-unsigned. Unsigned and forged commands, lease "
            "renewals and resumes are refused. Also "
            "CHAOS_AGENT_TRUST=a.pub,b.pub."
        ),
    ] = None,
    insecure_allow_unsigned: Annotated[
        bool | None,
        typer.Option(
            "--insecure-allow-unsigned",
            help="Laptop demos only: run without --trust and act on UNSIGNED "
            "commands, so anyone who can publish on the broker can inject "
            "faults. " + ENV.format("INSECURE_ALLOW_UNSIGNED"),
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML or JSON settings file (any setting, e.g. `policy:`); flags "
            "and environment override it. " + ENV.format("CONFIG")
        ),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning or error; default info.")
    ] = None,
) -> None:
    """Run the agent until SIGTERM or SIGINT, then revert every fault and exit.

    At start it reverts whatever its journal holds (left by a crash), then
    connects, publishes a retained status and waits for commands. The policy
    (caps no command can exceed) comes from the settings file or
    CHAOS_AGENT_POLICY__* variables, e.g. CHAOS_AGENT_POLICY__MAX_DURATION_S=600.
    """
    labels = None
    if label:
        try:
            labels = dict(parse_label(item) for item in label)
        except SettingsError as exc:
            _fail(str(exc))
    settings = _settings(
        {
            "broker": broker,
            "node": node,
            "site": site,
            "labels": labels,
            "state_dir": state_dir,
            "metrics_listen": metrics_listen,
            "telemetry_interval_s": telemetry_interval,
            "username": username,
            "password": password,
            "ca": ca,
            "cert": cert,
            "key": key,
            "trust": trust,
            "insecure_allow_unsigned": insecure_allow_unsigned or None,
            "config": config,
            "log_level": log_level,
        }
    )
    try:
        settings.check_trust()
    except SettingsError as exc:
        _fail(str(exc))
    logs.configure(settings.log_level, settings.log_format)

    # Imported here so that `check` and `--help` stay quick.
    from chaos_agent.agent import run_agent

    try:
        asyncio.run(run_agent(settings))
    except (JournalError, SettingsError, WireError) as exc:
        _fail(str(exc))


@app.command()
def check(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of tables.")
    ] = False,
    state_dir: Annotated[
        Path, typer.Option(help="State directory the drivers may probe.")
    ] = Path("/var/lib/aftershock"),
) -> None:
    """Print what this node can do, then exit.

    Cgroup version and controllers, CPUs, memory, network namespaces, and for
    every fault type whether its driver can run here (and if not, why and how
    to get it). Exit code 0 when at least one fault type is available, 1 when
    none is.
    """
    # Imported here: `run` needs none of it, and the agent stays smaller.
    from chaos_agent.capabilities import inspect_node
    from chaos_agent.faults import load_driver
    from chaos_agent.faults.base import FaultContext

    logs.configure("warning", "auto")
    context = FaultContext(
        policy=AgentSettings.model_fields["policy"].default, state_dir=state_dir
    )
    report = asyncio.run(inspect_node(load_driver, context))
    data = report.to_json()
    data["version"] = __version__

    if as_json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_report(data)
    if not report.capabilities().faults:
        raise typer.Exit(1)


def _print_report(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cgroup = data["cgroup"]
    console.print(f"[bold]chaos-agent {data['version']}[/]")
    console.print(
        f"cgroup {cgroup['version']} (controllers: "
        f"{', '.join(cgroup['controllers']) or 'none'}), {data['cpus']} CPUs, "
        f"{data['memory_total_bytes'] / 2**30:.1f} GiB memory, "
        f"network namespaces: {', '.join(data['netns']) or 'none'}"
    )
    table = Table("fault", "available", "facts / reason")
    for name, fault in data["faults"].items():
        facts = ", ".join(f"{k}={v}" for k, v in fault["facts"].items())
        table.add_row(
            name,
            "[green]yes[/]" if fault["ok"] else "[red]no[/]",
            facts if fault["ok"] else fault["reason"],
        )
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
