"""The `aftershock` command: fleet view, fault injection, halt, embedded broker.

Global options come before the command (`aftershock --broker URL agents`);
`--json` works in both places. Exit codes: 0 done, 1 a target rejected,
failed or timed out, 2 usage, refusal or connection error, 130/143
interrupted by SIGINT/SIGTERM (after reverting).

Commands that live in other modules (`run`, `demo`, `keygen`) register on
`app` themselves; see the end of this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import importlib.util
import inspect
import logging
import signal
import sys
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, NoReturn

import structlog
import typer
from pydantic import ValidationError
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from chaos_agent import wire
from coordinator import output
from coordinator.broker import DEFAULT_LISTEN, BrokerConfigError, parse_listen, serve
from coordinator.commands import (
    Coordinator,
    FaultSpec,
    Injection,
    InjectPlan,
    InjectRequest,
    InvalidRequest,
    Refused,
    Selector,
    Signer,
    describe_validation_error,
    key_signer,
    plan_inject,
    sign,
)
from coordinator.fleet import snapshot, telemetry_samples
from coordinator.mqtt import (
    DEFAULT_BROKER_URL,
    BrokerSettings,
    BrokerUnreachable,
    BrokerUrlError,
    ConnectionLost,
    Connector,
    mqtt_connector,
)
from coordinator.units import (
    ByteCount,
    UnitError,
    kbit,
    parse_duration,
    parse_rate,
    parse_size,
)

EXIT_OK: Final = 0
EXIT_TARGET_FAILED: Final = 1
EXIT_USAGE: Final = 2

app = typer.Typer(
    name="aftershock",
    help=(
        "Chaos experiments for edge clusters: command the chaos agents on your "
        "nodes over MQTT. Start with `aftershock agents`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
inject_app = typer.Typer(
    name="inject",
    help=(
        "Inject one fault into the matching agents for --duration, renewing its "
        "lease while this command runs, then wait for the reverts. Every target "
        "must apply it: if one refuses, the others are reverted at once."
    ),
    no_args_is_help=True,
)
app.add_typer(inject_app)


# -------------------------------------------------------------- global state


@dataclass
class CliDeps:
    """What a caller may replace: how to reach the broker and how to sign.

    Tests pass `CliRunner().invoke(app, args, obj=CliDeps(connector=...))`.
    """

    connector: Connector | None = None
    signer: Signer = sign


@dataclass
class CliState:
    broker_url: str = DEFAULT_BROKER_URL
    site: str | None = None
    username: str | None = None
    password: str | None = None
    json: bool = False
    deps: CliDeps = field(default_factory=CliDeps)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def connector(self) -> Connector:
        if self.deps.connector is not None:
            return self.deps.connector
        settings = BrokerSettings.from_url(
            self.broker_url,
            self.username,
            self.password,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
        )
        return mqtt_connector(settings)


JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")
]


def cli_state(ctx: typer.Context, json_flag: bool = False) -> CliState:
    """The global options, with a command's own `--json` folded in."""
    state = ctx.find_object(CliState)
    if state is None:
        state = CliState()
    if json_flag:
        state.json = True
    return state


def configure_logging(verbosity: int) -> None:
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)]
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=True),
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Looked up at each event, not bound once: tests swap sys.stderr.
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr)


@app.callback()
def global_options(
    ctx: typer.Context,
    broker: Annotated[
        str,
        typer.Option(
            envvar="AFTERSHOCK_BROKER",
            help="Broker URL: mqtt://HOST:PORT, or mqtts:// for TLS.",
        ),
    ] = DEFAULT_BROKER_URL,
    site: Annotated[
        str | None,
        typer.Option(envvar="AFTERSHOCK_SITE", help="Only agents of this site."),
    ] = None,
    username: Annotated[
        str | None, typer.Option(envvar="AFTERSHOCK_USERNAME", help="Broker user.")
    ] = None,
    password: Annotated[
        str | None,
        typer.Option(
            envvar="AFTERSHOCK_PASSWORD",
            help="Broker password (prefer the environment variable to the flag).",
        ),
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option(
            envvar="AFTERSHOCK_CA",
            help="mqtts: CA bundle that signed the broker's certificate.",
        ),
    ] = None,
    cert: Annotated[
        Path | None,
        typer.Option(
            envvar="AFTERSHOCK_CERT",
            help="mqtts: client certificate, for brokers that require mutual TLS.",
        ),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option(
            envvar="AFTERSHOCK_KEY", help="mqtts: the client certificate's key."
        ),
    ] = None,
    signing_key: Annotated[
        Path | None,
        typer.Option(
            envvar="AFTERSHOCK_SIGNING_KEY",
            help=(
                "Ed25519 private key (from `aftershock keygen`) that signs every "
                "command, lease and halt. Agents refuse unsigned commands unless "
                "they run with --insecure-allow-unsigned."
            ),
        ),
    ] = None,
    json_output: JsonFlag = False,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="-v info, -vv debug.")
    ] = 0,
) -> None:
    configure_logging(verbose)
    deps = ctx.obj if isinstance(ctx.obj, CliDeps) else CliDeps()
    if signing_key is not None:
        try:
            deps.signer = key_signer(wire.load_private_key(signing_key))
        except wire.WireError as exc:
            fail_usage(f"{exc}; create one with `aftershock keygen --out DIR`")
    ctx.obj = CliState(
        broker,
        site,
        username,
        password,
        json_output,
        deps,
        ca_file=str(ca) if ca else None,
        cert_file=str(cert) if cert else None,
        key_file=str(key) if key else None,
    )


def run_async(coroutine: Coroutine[Any, Any, int]) -> None:
    """Run a command's coroutine; turn known failures into one line and a code."""
    try:
        code = asyncio.run(coroutine)
    except (
        Refused,
        InvalidRequest,
        UnitError,
        BrokerUrlError,
        BrokerUnreachable,
        BrokerConfigError,
        ConnectionLost,
    ) as exc:
        output.error(str(exc))
        raise typer.Exit(EXIT_USAGE) from None
    raise typer.Exit(code)


def fail_usage(message: str) -> NoReturn:
    output.error(message)
    raise typer.Exit(EXIT_USAGE)


# ------------------------------------------------------------------- broker


@app.command("broker")
def broker_command(
    listen: Annotated[
        str, typer.Option(help="HOST:PORT to listen on; [::1]:PORT for IPv6.")
    ] = DEFAULT_LISTEN,
    password_file: Annotated[
        Path | None,
        typer.Option(
            help="File of user:argon2-hash lines (`aftershock broker-user` writes it).",
        ),
    ] = None,
    allow_anonymous: Annotated[
        bool | None,
        typer.Option(
            "--allow-anonymous/--no-anonymous",
            help=(
                "Default: anonymous clients only when listening on loopback "
                "without a password file."
            ),
        ),
    ] = None,
    json_flag: JsonFlag = False,
) -> None:
    """Run an embedded MQTT 3.1.1 broker until SIGTERM or Ctrl-C.

    For laptops and demos: it keeps nothing on disk, so retained statuses and
    halts are gone after a restart. Use Mosquitto for a real fleet.
    """

    def announce(url: str) -> None:
        if json_flag:
            output.print_json({"listening": url})
        else:
            output.stderr.print(f"aftershock broker listening on {url}")

    async def main() -> int:
        address = parse_listen(listen)
        await serve(
            address,
            password_file=password_file,
            allow_anonymous=allow_anonymous,
            ready=announce,
        )
        return EXIT_OK

    run_async(main())


@app.command("broker-user")
def broker_user_command(
    password_file: Annotated[Path, typer.Argument(help="Password file to update.")],
    user: Annotated[str, typer.Argument(help="User name to add or replace.")],
    password: Annotated[
        str,
        typer.Option(
            prompt=True,
            hide_input=True,
            confirmation_prompt=True,
            envvar="AFTERSHOCK_NEW_PASSWORD",
            help="Asked for when not given (or from AFTERSHOCK_NEW_PASSWORD).",
        ),
    ],
    json_output: JsonFlag = False,
) -> None:
    """Add or replace a user in the embedded broker's password file."""
    from coordinator.broker import hash_password

    if not user or ":" in user or user.strip() != user:
        fail_usage(f"user name {user!r} must be non-empty, without ':' or spaces")
    lines = password_file.read_text().splitlines() if password_file.exists() else []
    kept = [line for line in lines if line.split(":", 1)[0] != user]
    kept.append(f"{user}:{hash_password(password)}")
    password_file.write_text("\n".join(kept) + "\n")
    password_file.chmod(0o600)
    if json_output:
        output.print_json({"user": user, "password_file": str(password_file)})
    else:
        output.stderr.print(f"user {user} written to {password_file}")


# ------------------------------------------------------------ fleet commands


@app.command("agents")
def agents_command(ctx: typer.Context, json_flag: JsonFlag = False) -> None:
    """List agents: node, site, online, labels, capabilities, active faults."""
    state = cli_state(ctx, json_flag)

    async def main() -> int:
        async with state.connector()() as transport:
            fleet = await snapshot(transport, site=state.site)
        now = wire.utcnow()
        agents = fleet.sorted_agents(state.site)
        if state.json:
            output.print_json([output.agent_record(a, now) for a in agents])
        elif not agents:
            output.stderr.print(f"no agents have reported to {state.broker_url}")
        else:
            output.stdout.print(output.agents_table(agents, now))
        return EXIT_OK

    run_async(main())


@app.command("status")
def status_command(ctx: typer.Context, json_flag: JsonFlag = False) -> None:
    """Active faults across the fleet, as the agents report them."""
    state = cli_state(ctx, json_flag)

    async def main() -> int:
        async with state.connector()() as transport:
            fleet = await snapshot(transport, site=state.site)
        now = wire.utcnow()
        records = [
            output.fault_record(agent, fault, now)
            for agent, fault in fleet.active_faults(state.site)
        ]
        if state.json:
            output.print_json(records)
            return EXIT_OK

        for scope, halt in sorted(fleet.halts.items(), key=lambda i: i[0] or ""):
            if halt.halted:
                where = "fleet" if scope is None else f"site {scope}"
                output.stdout.print(f"[yellow]{where} halted[/]: {halt.reason or '-'}")
        if records:
            output.stdout.print(output.faults_table(records))
        else:
            output.stdout.print("no active faults")
        return EXIT_OK

    run_async(main())


@app.command("watch")
def watch_command(
    ctx: typer.Context,
    count: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many samples.")
    ] = None,
    json_flag: JsonFlag = False,
) -> None:
    """Live telemetry of every agent; with --json one JSON line per sample."""
    state = cli_state(ctx, json_flag)

    async def main() -> int:
        latest: dict[tuple[str, str], wire.Telemetry] = {}
        seen = 0
        async with state.connector()() as transport:
            samples = telemetry_samples(transport, state.site)
            with contextlib.ExitStack() as stack:
                live = None
                if not state.json:
                    live = stack.enter_context(
                        Live(output.telemetry_table([]), console=output.stdout)
                    )
                async for sample in samples:
                    seen += 1
                    if live is None:
                        output.print_json(output.telemetry_record(sample))
                    else:
                        latest[(sample.site, sample.node)] = sample
                        rows = [latest[k] for k in sorted(latest)]
                        live.update(output.telemetry_table(rows))
                    if count is not None and seen >= count:
                        break
        return EXIT_OK

    with contextlib.suppress(KeyboardInterrupt):
        run_async(main())


@app.command("halt")
def halt_command(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option(help="Why; agents report it.")] = "",
    site: Annotated[
        str | None, typer.Option(help="Halt only this site (default: every site).")
    ] = None,
    json_flag: JsonFlag = False,
) -> None:
    """Stop all chaos: agents revert every fault and refuse new ones.

    The halt is retained on the broker, so agents that connect later see it
    at once. It lasts until `aftershock resume`.
    """
    state = cli_state(ctx, json_flag)
    scope = site or state.site

    async def main() -> int:
        async with state.connector()() as transport:
            coordinator = Coordinator(transport, signer=state.deps.signer)
            halt = await coordinator.halt(reason, scope)
        if state.json:
            output.print_json({"halted": True, "site": scope, "reason": halt.reason})
        else:
            where = "the fleet" if scope is None else f"site {scope}"
            output.stdout.print(f"halted {where}: agents revert every fault")
        return EXIT_OK

    run_async(main())


@app.command("resume")
def resume_command(
    ctx: typer.Context,
    site: Annotated[
        str | None,
        typer.Option(help="Resume only this site (default: the global halt)."),
    ] = None,
    json_flag: JsonFlag = False,
) -> None:
    """Lift a halt, so agents accept faults again."""
    state = cli_state(ctx, json_flag)
    scope = site or state.site

    async def main() -> int:
        async with (
            state.connector()() as transport,
            Coordinator(transport, signer=state.deps.signer) as coordinator,
        ):
            await coordinator.resume(scope)
            fleet = await coordinator.snapshot(scope)
        still = [
            "fleet" if s is None else f"site {s}"
            for s, halt in fleet.halts.items()
            if halt.halted and (s is None or s == scope)
        ]
        if state.json:
            output.print_json({"halted": False, "site": scope, "still_halted": still})
        else:
            where = "the fleet" if scope is None else f"site {scope}"
            output.stdout.print(f"resumed {where}")
            for name in still:
                output.stderr.print(f"[yellow]the {name} is still halted[/]")
        return EXIT_OK

    run_async(main())


# -------------------------------------------------------------------- inject

DurationText = Annotated[
    str,
    typer.Option(
        "--duration",
        rich_help_panel="Timing",
        help="How long the fault lasts, e.g. 30s, 2m. The agent enforces it.",
    ),
]


@dataclass(frozen=True)
class InjectOptions:
    duration: str
    lease: str
    experiment: str | None
    site: str | None
    node: list[str]
    select: list[str]
    count: int | None
    percent: float | None
    seed: int | None
    ack_timeout: str
    dry_run: bool
    detach: bool
    json: bool


def _common_inject_options(
    duration: DurationText,
    lease: Annotated[
        str,
        typer.Option(
            rich_help_panel="Timing",
            help=(
                "Agents revert when no renewal arrives for this long (this "
                "command renews every third of it), e.g. if this command dies."
            ),
        ),
    ] = "15s",
    experiment: Annotated[
        str | None,
        typer.Option(
            rich_help_panel="Output", help="Experiment name (default: generated)."
        ),
    ] = None,
    site: Annotated[
        str | None,
        typer.Option(rich_help_panel="Targets", help="Only agents of this site."),
    ] = None,
    node: Annotated[
        list[str] | None,
        typer.Option(rich_help_panel="Targets", help="Only this node (repeatable)."),
    ] = None,
    select: Annotated[
        list[str] | None,
        typer.Option(
            rich_help_panel="Targets",
            help="Only agents with label k=v (repeatable, all must match).",
        ),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option(
            rich_help_panel="Targets",
            help="A random sample of this many matching agents.",
        ),
    ] = None,
    percent: Annotated[
        float | None,
        typer.Option(
            rich_help_panel="Targets",
            help="A random sample of this share of the matching agents.",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            rich_help_panel="Targets", help="Seed of the --count/--percent sample."
        ),
    ] = None,
    ack_timeout: Annotated[
        str,
        typer.Option(
            rich_help_panel="Timing",
            help="How long to wait for every target to apply, or revert.",
        ),
    ] = "10s",
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            rich_help_panel="Output",
            help="Resolve and print the targets and the command; send nothing.",
        ),
    ] = False,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            rich_help_panel="Timing",
            help=(
                "Return once applied. Nobody renews the lease, so it is set to the "
                "duration: the agent's own duration is then the only bound (stop "
                "it early with `aftershock halt`). Agents refuse a lease above "
                "their max_lease_s (default 300s)."
            ),
        ),
    ] = False,
    json_flag: JsonFlag = False,
) -> InjectOptions:
    return InjectOptions(
        duration, lease, experiment, site, node or [], select or [], count,
        percent, seed, ack_timeout, dry_run, detach, json_flag,
    )  # fmt: skip


def inject_command(
    name: str,
) -> Callable[[Callable[..., FaultSpec]], Callable[..., FaultSpec]]:
    """Register `build` (fault options -> fault model) as `inject NAME`.

    The command takes `build`'s own options plus the common ones of
    `_common_inject_options`, so every fault type targets, times and reports
    the same way and each `--help` lists only what applies.
    """

    def register(build: Callable[..., FaultSpec]) -> Callable[..., FaultSpec]:
        fault_params = inspect.signature(build, eval_str=True).parameters
        common_params = inspect.signature(
            _common_inject_options, eval_str=True
        ).parameters

        @functools.wraps(build)
        def command(ctx: typer.Context, **values: Any) -> None:
            common = _common_inject_options(
                **{k: values.pop(k) for k in common_params if k in values}
            )
            try:
                fault = build(**values)
            except ValidationError as exc:
                fail_usage(describe_validation_error(f"{name} fault", exc))
            except (UnitError, wire.WireError) as exc:
                fail_usage(str(exc))
            _inject(ctx, fault, common)

        ctx_param = inspect.Parameter(
            "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
        )
        # Keyword-only, so required options may follow ones with defaults.
        options = [*fault_params.values(), *common_params.values()]
        keyword_only = inspect.Parameter.KEYWORD_ONLY
        parameters = [ctx_param, *(p.replace(kind=keyword_only) for p in options)]
        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        inject_app.command(name)(command)
        return build

    return register


def _inject(ctx: typer.Context, fault: FaultSpec, options: InjectOptions) -> None:
    state = cli_state(ctx, options.json)
    try:
        request = _inject_request(state, fault, options)
        ack_timeout_s = parse_duration(options.ack_timeout)
    except (InvalidRequest, UnitError) as exc:
        fail_usage(str(exc))
    run_async(_run_inject(state, request, options, ack_timeout_s))


def _inject_request(
    state: CliState, fault: FaultSpec, options: InjectOptions
) -> InjectRequest:
    duration_s = parse_duration(options.duration)
    lease_s = parse_duration(options.lease)
    if options.detach:
        # Nobody stays to renew a lease, so the lease must cover the duration.
        lease_s = duration_s
    labels = {}
    for pair in options.select:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            msg = f"--select {pair!r} is not a label match: use KEY=VALUE"
            raise InvalidRequest(msg)
        labels[key] = value

    selector = Selector(
        nodes=tuple(options.node),
        site=options.site or state.site,
        labels=labels,
        count=options.count,
        percent=options.percent,
        seed=options.seed,
    )
    experiment = options.experiment or _experiment_name(fault.type)
    return InjectRequest(fault, duration_s, lease_s, experiment, selector)


def _experiment_name(fault_type: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"adhoc-{fault_type}-{stamp}-{uuid.uuid4().hex[:4]}"


async def _run_inject(
    state: CliState,
    request: InjectRequest,
    options: InjectOptions,
    ack_timeout_s: float,
) -> int:
    task = asyncio.current_task()
    assert task is not None
    interrupted: list[int] = []

    def on_signal(signum: int) -> None:
        # The first signal reverts and exits; a second one exits at once.
        if interrupted:
            raise SystemExit(128 + signum)
        interrupted.append(signum)
        output.stderr.print("interrupted: reverting the fault ...")
        task.cancel()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)

    injection: Injection | None = None
    try:
        async with (
            state.connector()() as transport,
            Coordinator(transport, signer=state.deps.signer) as coordinator,
        ):
            fleet = await coordinator.snapshot(request.selector.site)
            plan = plan_inject(fleet, request, coordinator.signer)
            if options.dry_run:
                _print_plan(plan, state.json)
                return EXIT_OK

            injection = coordinator.inject(plan, ack_timeout_s=ack_timeout_s)
            async with injection:
                # All or nothing: when a target did not apply, leaving the
                # block reverts the ones that did.
                if injection.all_applied and options.detach:
                    injection.detach()
                elif injection.all_applied:
                    await _hold_with_progress(injection, plan.duration_s, state.json)
    except asyncio.CancelledError:
        if not interrupted:
            raise
        task.uncancel()
    if injection is None:
        return 128 + interrupted[0]  # interrupted before anything was sent

    results = list(injection.results.values())
    if state.json:
        record = output.inject_record(
            injection.plan, results, detached=injection.detached
        )
        output.print_json(record)
    else:
        output.stdout.print(output.results_table(injection.plan, results))
    if interrupted:
        return 128 + interrupted[0]
    fine = injection.all_applied and (injection.detached or injection.all_reverted)
    return EXIT_OK if fine else EXIT_TARGET_FAILED


def _print_plan(plan: InjectPlan, as_json: bool) -> None:
    if as_json:
        output.print_json(output.plan_record(plan))
    else:
        output.stdout.print(output.plan_table(plan))
        output.stdout.print_json(plan.command.model_dump_json())


async def _hold_with_progress(
    injection: Injection, duration_s: float, quiet: bool
) -> None:
    if quiet:
        await injection.hold()
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=output.stderr, transient=True) as progress:
        task = progress.add_task(
            f"{len(injection.results)} node(s) faulted", total=duration_s
        )
        await injection.hold(
            progress=lambda elapsed: progress.update(task, completed=elapsed)
        )


# One builder per fault type: its options, mapped onto the wire model.

NetnsOption = Annotated[
    str | None,
    typer.Option(
        rich_help_panel="Where", help="Named network namespace (ip netns) to fault."
    ),
]
NetnsPidOption = Annotated[
    int | None,
    typer.Option(
        rich_help_panel="Where",
        help="Fault the network namespace of this pid (a pod's).",
    ),
]
InterfaceOption = Annotated[
    str | None,
    typer.Option(
        rich_help_panel="Where", help="Interface (default: the default route's)."
    ),
]
RouteToOption = Annotated[
    str | None,
    typer.Option(
        rich_help_panel="Where", help="Fault the interface that routes to this address."
    ),
]
ExemptOption = Annotated[
    list[str] | None,
    typer.Option(
        rich_help_panel="Where",
        help="Never fault traffic to this address/CIDR (repeatable).",
    ),
]
FaultBrokerOption = Annotated[
    bool,
    typer.Option(
        "--fault-broker-traffic",
        rich_help_panel="Where",
        help="Also fault the agent's own broker traffic (it may lose its lease).",
    ),
]


def _network_fields(
    netns: str | None,
    netns_pid: int | None,
    interface: str | None,
    route_to: str | None,
    exempt: list[str] | None,
    fault_broker_traffic: bool,
) -> dict[str, Any]:
    where = wire.NetworkTarget(
        netns=netns, netns_pid=netns_pid, interface=interface, route_to=route_to
    )
    return {
        "where": where,
        "exempt": [wire.parse_network(e) for e in exempt or []],
        "exempt_broker": not fault_broker_traffic,
    }


@inject_command("cpu")
def cpu_fault(
    load: Annotated[int, typer.Option(help="Load per worker, percent of one CPU.")],
    workers: Annotated[
        int | None, typer.Option(help="Busy workers (default: one per CPU).")
    ] = None,
) -> FaultSpec:
    """Keep CPUs busy at --load percent (in a cgroup below the agent)."""
    return wire.CpuFault(load_percent=load, workers=workers)


@inject_command("memory")
def memory_fault(
    size: Annotated[
        str, typer.Option(help="512MiB, 1Gi, 1G (10^9 bytes) or 30% of node memory.")
    ],
    ramp: Annotated[str, typer.Option(help="Reach the size over this long.")] = "0s",
) -> FaultSpec:
    """Hold resident memory (an OOM-safe reserve always stays free)."""
    parsed = parse_size(size)
    ramp_s = parse_duration(ramp)
    if isinstance(parsed, ByteCount):
        return wire.MemoryFault(bytes=parsed.bytes, ramp_s=ramp_s)
    return wire.MemoryFault(percent=parsed.percent, ramp_s=ramp_s)


@inject_command("latency")
def latency_fault(
    delay: Annotated[str, typer.Option(help="Added delay, e.g. 200ms.")],
    jitter: Annotated[str, typer.Option(help="Random variation of the delay.")] = "0ms",
    correlation: Annotated[float, typer.Option(help="Jitter correlation, %.")] = 0.0,
    loss: Annotated[float, typer.Option(help="Packet loss, % (netem only).")] = 0.0,
    duplicate: Annotated[float, typer.Option(help="Duplicated packets, %.")] = 0.0,
    corrupt: Annotated[float, typer.Option(help="Corrupted packets, %.")] = 0.0,
    reorder: Annotated[float, typer.Option(help="Reordered packets, %.")] = 0.0,
    rate: Annotated[str | None, typer.Option(help="Rate cap, e.g. 10mbit.")] = None,
    engine: Annotated[
        str,
        typer.Option(
            help=(
                "netem (kernel), proxy (userspace TCP delay where the kernel has "
                "no netem: delay and jitter only), or auto."
            ),
        ),
    ] = "auto",
    port: Annotated[
        list[int] | None,
        typer.Option(help="Proxy engine: TCP port to delay (repeatable)."),
    ] = None,
    direction: Annotated[
        str, typer.Option(help="Proxy engine: both, ingress or egress.")
    ] = "both",
    netns: NetnsOption = None,
    netns_pid: NetnsPidOption = None,
    interface: InterfaceOption = None,
    route_to: RouteToOption = None,
    exempt: ExemptOption = None,
    fault_broker_traffic: FaultBrokerOption = False,
) -> FaultSpec:
    """Delay (and optionally drop, duplicate, corrupt, reorder) packets."""
    return wire.LatencyFault.model_validate(
        {
            "delay_ms": parse_duration(delay) * 1000,
            "jitter_ms": parse_duration(jitter) * 1000,
            "correlation_pct": correlation,
            "loss_pct": loss,
            "duplicate_pct": duplicate,
            "corrupt_pct": corrupt,
            "reorder_pct": reorder,
            "rate_kbit": kbit(parse_rate(rate)) if rate else None,
            "engine": engine,
            "ports": port or [],
            "direction": direction,
            **_network_fields(
                netns, netns_pid, interface, route_to, exempt, fault_broker_traffic
            ),
        }
    )


@inject_command("bandwidth")
def bandwidth_fault(
    rate: Annotated[str, typer.Option(help="Rate limit, e.g. 1mbit, 512kbit.")],
    burst: Annotated[str, typer.Option(help="Bucket size, e.g. 32KiB.")] = "32KiB",
    latency: Annotated[
        str, typer.Option(help="Longest a packet may queue before it is dropped.")
    ] = "50ms",
    netns: NetnsOption = None,
    netns_pid: NetnsPidOption = None,
    interface: InterfaceOption = None,
    route_to: RouteToOption = None,
    exempt: ExemptOption = None,
    fault_broker_traffic: FaultBrokerOption = False,
) -> FaultSpec:
    """Limit egress bandwidth with a token bucket filter (tbf)."""
    burst_size = parse_size(burst)
    if not isinstance(burst_size, ByteCount):
        msg = f"--burst {burst!r} must be a byte count such as 32KiB"
        raise UnitError(msg)
    return wire.BandwidthFault.model_validate(
        {
            "rate_kbit": kbit(parse_rate(rate)),
            "burst_bytes": burst_size.bytes,
            "latency_ms": parse_duration(latency) * 1000,
            **_network_fields(
                netns, netns_pid, interface, route_to, exempt, fault_broker_traffic
            ),
        }
    )


@inject_command("partition")
def partition_fault(
    peer: Annotated[
        list[str], typer.Option(help="Address or CIDR to cut off (repeatable).")
    ],
    direction: Annotated[str, typer.Option(help="both, ingress or egress.")] = "both",
    netns: NetnsOption = None,
    netns_pid: NetnsPidOption = None,
    exempt: ExemptOption = None,
    fault_broker_traffic: FaultBrokerOption = False,
) -> FaultSpec:
    """Drop traffic to and/or from peers (nftables)."""
    return wire.PartitionFault.model_validate(
        {
            "peers": [wire.parse_network(p) for p in peer],
            "direction": direction,
            **_network_fields(
                netns, netns_pid, None, None, exempt, fault_broker_traffic
            ),
        }
    )


@inject_command("corrupt-state")
def corrupt_state_fault(
    path: Annotated[str, typer.Option(help="State file on the node.")],
    adapter: Annotated[str, typer.Option(help="sqlite, json or bytes.")] = "sqlite",
    mode: Annotated[str, typer.Option(help="bitflip, set or scale.")] = "bitflip",
    factor: Annotated[
        float | None, typer.Option(help="mode scale: multiply by.")
    ] = None,
    value: Annotated[
        float | None, typer.Option(help="mode set: the new value.")
    ] = None,
    bits: Annotated[int, typer.Option(help="mode bitflip: bits per value.")] = 1,
    table: Annotated[str, typer.Option(help="sqlite: table.")] = "buckets",
    key_column: Annotated[str, typer.Option(help="sqlite: key column.")] = "key",
    value_column: Annotated[
        str, typer.Option(help="sqlite: value column.")
    ] = "consumed",
    key_filter: Annotated[str, typer.Option(help="Keys to touch (glob).")] = "*",
    json_path: Annotated[
        str | None, typer.Option(help="json: dotted path, * for every key.")
    ] = None,
    max_rows: Annotated[int, typer.Option(help="Most values changed.")] = 1000,
    restore: Annotated[
        bool, typer.Option(help="Restore the snapshot on revert (default: leave it).")
    ] = False,
    corrupt_seed: Annotated[
        int | None, typer.Option(help="Seed of which values and bits change.")
    ] = None,
) -> FaultSpec:
    """Corrupt local bucket state: flip bits, set or scale stored values."""
    return wire.CorruptStateFault.model_validate(
        {
            "path": path,
            "adapter": adapter,
            "mode": mode,
            "factor": factor,
            "value": value,
            "bits": bits,
            "table": table,
            "key_column": key_column,
            "value_column": value_column,
            "key_filter": key_filter,
            "json_path": json_path,
            "max_rows": max_rows,
            "restore": restore,
            "seed": corrupt_seed,
        }
    )


@inject_command("process")
def process_fault(
    action: Annotated[
        str, typer.Option(help="kill (with --signal) or pause (SIGSTOP until revert).")
    ] = "kill",
    process_signal: Annotated[
        str, typer.Option("--signal", help="Signal for kill, e.g. SIGTERM.")
    ] = "SIGKILL",
    name: Annotated[str | None, typer.Option(help="Process name.")] = None,
    pid: Annotated[int | None, typer.Option(help="Process id.")] = None,
    pidfile: Annotated[str | None, typer.Option(help="File holding the pid.")] = None,
    cgroup: Annotated[
        str | None, typer.Option(help="Every process of this cgroup.")
    ] = None,
) -> FaultSpec:
    """Kill or pause a process, chosen one way: name, pid, pidfile or cgroup."""
    return wire.ProcessFault.model_validate(
        {
            "action": action,
            "signal": process_signal,
            "name": name,
            "pid": pid,
            "pidfile": pidfile,
            "cgroup": cgroup,
        }
    )


# ----------------------------------------------------------- other modules

# Commands owned by other modules register on `app` when imported:
#   coordinator.experiment_cli: `run`, `demo`    coordinator.keygen_cli: `keygen`
# Such a module does `from coordinator.cli import app, cli_state, run_async`
# and decorates its functions with `@app.command(...)`.
_EXTENSIONS: Final = ("coordinator.experiment_cli", "coordinator.keygen_cli")
for _extension in _EXTENSIONS:
    if importlib.util.find_spec(_extension) is not None:
        importlib.import_module(_extension)


def main() -> None:
    app(prog_name="aftershock")


if __name__ == "__main__":
    # Run the app of the importable module, the one extensions register on,
    # not this `__main__` copy of it.
    importlib.import_module("coordinator.cli").main()
