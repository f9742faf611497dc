"""Experiments: the model read from YAML, and the runner that carries one out.

An experiment file names the system under test, the open-loop load, the
steady-state hypothesis (the three SLOs by default), the method (phases of
faults with targets and durations), abort conditions checked continuously,
and the recovery window. Every model is strict: an unknown field or a bad
value is an error that names the line of the file and the field.

A minimal experiment::

    name: cpu-pressure
    system:
      endpoints:
        - {name: a, url: "http://10.0.0.1:8080", node: edge-1}
    load: {rate: 100}
    method:
      - name: squeeze
        faults:
          - type: cpu
            params: {load_percent: 80}
            target: {nodes: [edge-1]}
            duration: 30s
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import aiohttp
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from chaos_agent import wire
from chaos_agent.wire import FAULT_TYPES, Fault, LabelKey, LabelValue, Name
from coordinator import analysis
from coordinator.analysis import FaultWindow, Finding
from coordinator.commands import (
    Coordinator,
    InjectRequest,
    MissingCapability,
    Refused,
    Selector,
    Signer,
    plan_inject,
    resolve_targets,
    sign,
)
from coordinator.fleet import FleetView
from coordinator.load import Clock, LoadGenerator, Replica
from coordinator.mqtt import BrokerUnreachable, ConnectionLost, Connector, Received
from coordinator.probes import (
    DriftProbe,
    ProbeError,
    Samples,
    TelemetryProbe,
    scrape_metrics,
    service_deltas,
)
from coordinator.report import Journal, Outcome, RunResult, write_report
from coordinator.units import parse_duration

# ------------------------------------------------------------------ durations


def _duration(value: object) -> float:
    # A bare number is refused as on the command line: 30 could be seconds
    # or minutes, and a chaos tool must not guess.
    if not isinstance(value, str):
        msg = f"{value!r} is not a duration: write it with a unit, e.g. 30s or 200ms"
        raise ValueError(msg)
    return parse_duration(value)


Seconds = Annotated[float, BeforeValidator(_duration)]
PositiveSeconds = Annotated[Seconds, Field(gt=0)]

# ---------------------------------------------------------------------- model


class ExperimentModel(BaseModel):
    """Base of the experiment file's models: strict, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Endpoint(ExperimentModel):
    """One replica of the system under test."""

    name: Name
    url: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$")]
    # The agent's node that hosts this replica: how the analysis knows which
    # replica a fault aimed at a node hits.
    node: Name | None = None


class SystemSpec(ExperimentModel):
    """The system under test: its replicas by URL, or agents' labels to find them.

    With `labels`, every live agent whose labels match contributes one
    replica, named after its node, at the URL in its `url_label` label.
    """

    endpoints: Annotated[list[Endpoint], Field(max_length=256)] = []
    labels: dict[LabelKey, LabelValue] = {}
    url_label: LabelKey = "aftershock.io/url"
    # Each replica's Prometheus page, scraped at the start and the end of the
    # run for the service's own counts; None skips it.
    metrics_path: Annotated[str, Field(pattern=r"^/\S*$")] | None = "/metrics"

    @model_validator(mode="after")
    def _some_way_to_find_replicas(self) -> SystemSpec:
        if not self.endpoints and not self.labels:
            msg = "name the replicas: give endpoints, or labels of the agents"
            raise ValueError(msg)
        names = [e.name for e in self.endpoints]
        if len(names) != len(set(names)):
            msg = f"endpoint names must be unique (got {', '.join(names)})"
            raise ValueError(msg)
        return self


class KeySpec(ExperimentModel):
    """The bucket keys the load spreads over; `{i}` is the key's index."""

    count: Annotated[int, Field(ge=1, le=1_000_000)] = 100
    pattern: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:{}-]{1,128}$")] = "key-{i}"

    @model_validator(mode="after")
    def _pattern_has_index(self) -> KeySpec:
        if self.count > 1 and "{i}" not in self.pattern:
            msg = f"pattern {self.pattern!r} needs {{i}} to make {self.count} keys"
            raise ValueError(msg)
        return self

    def names(self) -> list[str]:
        return [self.pattern.replace("{i}", str(i)) for i in range(self.count)]


class LoadSpec(ExperimentModel):
    """Open-loop load: requests are sent at `rate` per second whatever the
    answers take, round robin over the replicas."""

    rate: Annotated[float, Field(gt=0, le=100_000)]
    # None: for the whole run, steady states and recovery included.
    duration: PositiveSeconds | None = None
    keys: KeySpec = KeySpec()
    # The request each replica gets; `{key}` is replaced by the bucket key.
    request: Literal["GET", "POST"] = "POST"
    path: Annotated[str, Field(pattern=r"^/\S*$")] = "/v1/take/{key}"
    timeout: PositiveSeconds = 2.0
    connections: Annotated[int, Field(ge=1, le=10_000)] = 64
    # Keep-alive connections are replaced by fresh ones this often (null:
    # never), as behind a load balancer; the proxy latency engine delays
    # only connections opened after it applies.
    connection_max_age: PositiveSeconds | None = 5.0


class Hypothesis(ExperimentModel):
    """The steady-state hypothesis: the service levels the run must keep."""

    p99_ms: Annotated[float, Field(gt=0)] = 120.0
    # 5xx and transport errors over all requests; 429 is not an error.
    error_rate_pct: Annotated[float, Field(ge=0, le=100)] = 0.1
    # Drift between replicas after recovery, as a share of bucket capacity.
    drift_pct: Annotated[float, Field(ge=0, le=100)] = 2.0


class TargetSpec(ExperimentModel):
    """Which agents a fault goes to. Empty: every agent of the fleet.

    `count` or `percent` sample that many of the matching agents.
    """

    sites: list[Name] = []
    nodes: list[Name] = []
    labels: dict[LabelKey, LabelValue] = {}
    count: Annotated[int, Field(ge=1)] | None = None
    percent: Annotated[float, Field(gt=0, le=100)] | None = None

    @model_validator(mode="after")
    def _one_sampling(self) -> TargetSpec:
        if self.count is not None and self.percent is not None:
            msg = "sample by count or by percent, not both"
            raise ValueError(msg)
        return self


_FAULT_ADAPTER: Final[TypeAdapter[Any]] = TypeAdapter(Fault)


class FaultStep(ExperimentModel):
    """One fault of a phase: its type, its parameters (the fields of the wire
    model of that type), where it goes and how long it lasts."""

    type: Literal[FAULT_TYPES]  # type: ignore[valid-type]
    params: dict[str, Any] = {}
    target: TargetSpec = TargetSpec()
    duration: PositiveSeconds
    name: Name | None = None

    @model_validator(mode="after")
    def _params_fit_the_type(self) -> FaultStep:
        try:
            _FAULT_ADAPTER.validate_python({**self.params, "type": self.type})
        except ValidationError as exc:
            # The context carries each problem's place inside `params`, so
            # `load_experiment` can point at the exact line of the file.
            problems = [
                (tuple(e["loc"][1:]), e["msg"]) for e in exc.errors(include_url=False)
            ]
            raise PydanticCustomError(
                "fault_params",
                "{summary}",
                {"summary": _summarise(problems), "problems": problems},
            ) from None
        return self

    @property
    def fault(self) -> Any:
        """The wire fault (`chaos_agent.wire.Fault`) this step injects."""
        return _FAULT_ADAPTER.validate_python({**self.params, "type": self.type})

    @property
    def label(self) -> str:
        return self.name or self.type


def _summarise(problems: Sequence[tuple[tuple[Any, ...], str]]) -> str:
    parts = [f"{'.'.join(str(p) for p in loc) or 'params'}: {m}" for loc, m in problems]
    return "; ".join(parts)


class Phase(ExperimentModel):
    """Faults that run together (`parallel`) or one after another (`serial`)."""

    name: Name
    faults: Annotated[list[FaultStep], Field(min_length=1, max_length=64)]
    mode: Literal["parallel", "serial"] = "parallel"
    # Pause after the phase's faults are reverted, before the next phase.
    settle: Seconds = 0.0

    @property
    def duration(self) -> float:
        spans = [f.duration for f in self.faults]
        return sum(spans) if self.mode == "serial" else max(spans)


Metric = Literal["error_rate_pct", "p99_ms"]


class AbortCondition(ExperimentModel):
    """Stop the run and revert its faults when `metric` over the last `window`
    exceeds `above`."""

    metric: Metric
    above: Annotated[float, Field(ge=0)]
    window: PositiveSeconds = 5.0
    # Fewer requests than this in the window decide nothing.
    min_requests: Annotated[int, Field(ge=1)] = 20


DEFAULT_ABORTS: Final = (
    AbortCondition(metric="error_rate_pct", above=5.0),
    AbortCondition(metric="p99_ms", above=1000.0),
)


class Recovery(ExperimentModel):
    """After the last revert, drift is sampled until it stays under
    `drift_pct` for `stable_for`, or `max` has passed."""

    max: PositiveSeconds = 60.0
    drift_pct: Annotated[float, Field(ge=0, le=100)] = 2.0
    stable_for: Seconds = 3.0


class DriftSampling(ExperimentModel):
    """How drift is measured: a few keys read from every replica at once."""

    keys: Annotated[int, Field(ge=1, le=1000)] = 5
    interval: PositiveSeconds = 1.0


class Experiment(ExperimentModel):
    """A chaos experiment, as read from its YAML file."""

    name: Name
    description: str = ""
    system: SystemSpec
    load: LoadSpec
    hypothesis: Hypothesis = Hypothesis()
    method: Annotated[list[Phase], Field(min_length=1, max_length=256)]
    abort: list[AbortCondition] = list(DEFAULT_ABORTS)
    recovery: Recovery = Recovery()
    drift: DriftSampling = DriftSampling()
    # Load sent before the steady state and left out of every figure: cold
    # connection pools and caches say nothing about the hypothesis.
    warmup: Seconds = 2.0
    # Steady state measured before the first fault and after recovery.
    steady_state: PositiveSeconds = 5.0
    check_interval: PositiveSeconds = 1.0
    # A steady state that misses the hypothesis before any fault ends the run
    # (exit 2); false runs the method anyway and notes it in the findings.
    require_steady_state: bool = True
    # Agents revert on their own when renewals stop for this long.
    lease: PositiveSeconds = 15.0
    # How long every target of a fault has to acknowledge it; a node silent
    # past this is reported and asked to revert. Raise it for slow nodes.
    ack_timeout: PositiveSeconds = 10.0

    @model_validator(mode="after")
    def _unique_phase_names(self) -> Experiment:
        names = [p.name for p in self.method]
        if len(names) != len(set(names)):
            msg = f"phase names must be unique (got {', '.join(names)})"
            raise ValueError(msg)
        return self

    @property
    def fault_seconds(self) -> float:
        return sum(p.duration + p.settle for p in self.method)


# -------------------------------------------------------------------- loading


class ExperimentError(ValueError):
    """An experiment file that cannot be run; `problems` lists each one as
    (line, field path, message), line 0 when the file has no such place."""

    def __init__(self, source: str, problems: list[tuple[int, str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}:{line}: {path}: {msg}" for line, path, msg in problems]
        super().__init__("invalid experiment\n" + "\n".join(lines))


def load_experiment(path: Path) -> Experiment:
    """Read and validate an experiment file; raise ExperimentError naming
    the line and the field of every problem."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ExperimentError(
            str(path), [(0, "file", exc.strerror or str(exc))]
        ) from None
    return parse_experiment(text, source=str(path))


def parse_experiment(text: str, source: str = "<experiment>") -> Experiment:
    """Validate experiment YAML given as text (see `load_experiment`)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        problem = getattr(exc, "problem", None) or str(exc)
        raise ExperimentError(source, [(line, "yaml", problem)]) from None
    if not isinstance(data, dict):
        msg = "the file must hold a mapping with name, system, load and method"
        raise ExperimentError(source, [(1, "document", msg)])

    try:
        return Experiment.model_validate(data)
    except ValidationError as exc:
        raise ExperimentError(source, _locate(root, exc)) from None


def _locate(root: yaml.Node | None, exc: ValidationError) -> list[tuple[int, str, str]]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        ctx = err.get("ctx") or {}
        if err["type"] == "fault_params":
            for inner, msg in ctx["problems"]:
                where = (*loc, "params", *inner)
                problems.append((_line_of(root, where), _dotted(where), msg))
            continue
        message = err["msg"].removeprefix("Value error, ")
        problems.append((_line_of(root, loc), _dotted(loc), message))
    return problems


def _dotted(loc: Sequence[Any]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "document"


def _line_of(node: yaml.Node | None, loc: Sequence[Any]) -> int:
    """The 1-based line of the deepest YAML node on the path `loc`: the
    field's own line when it exists, its parent's when it is missing."""
    if node is None:
        return 1
    line = node.start_mark.line + 1
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    child = value
                    line = key.start_mark.line + 1
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


# --------------------------------------------------------------------- runner
#
# A run: steady state before -> inject each phase (leases renewed while the
# faults hold) -> observe, checking the abort conditions every check interval
# -> revert (always, also on abort, error or Ctrl-C) -> recovery (drift sampled
# until it converges or the window ends) -> steady state after -> verdicts.


@dataclass(frozen=True)
class Progress:
    """A snapshot of a running experiment for a live display."""

    stage: str
    t: float
    requests: int
    # Over the last check window.
    p99_ms: float | None
    error_rate_pct: float
    drift_pct: float | None
    active_faults: tuple[str, ...]
    message: str = ""


ProgressCallback = Callable[[Progress], None]


class RunFailed(Exception):
    """The run cannot go on (no broker, no replica, fleet halted); the text
    says what to fix. The runner reports it as outcome `failed`, exit 2."""


class _Aborted(Exception):
    pass


@dataclass(frozen=True)
class PlannedFault:
    """One fault of the method resolved against the fleet, for --dry-run."""

    phase: str
    name: str
    type: str
    duration_s: float
    nodes: tuple[str, ...]
    skipped: str | None = None


def resolve_replicas(
    experiment: Experiment, fleet: FleetView | None
) -> tuple[list[Replica], dict[str, str]]:
    """The replicas to load, and which node hosts each (replica -> node)."""
    system = experiment.system
    if system.endpoints:
        replicas = [Replica(e.name, e.url) for e in system.endpoints]
        hosts = {e.name: e.node for e in system.endpoints if e.node}
        return replicas, hosts

    if fleet is None:
        msg = "system.labels needs the live fleet: give --broker, or list endpoints"
        raise RunFailed(msg)
    replicas, hosts = [], {}
    for agent in fleet.sorted_agents():
        if not agent.online:
            continue
        if any(agent.labels.get(k) != v for k, v in system.labels.items()):
            continue
        url = agent.labels.get(system.url_label)
        if url is None:
            msg = (
                f"agent {agent.node} matches system.labels but has no "
                f"{system.url_label!r} label with its replica's URL"
            )
            raise RunFailed(msg)
        replicas.append(Replica(agent.node, url))
        hosts[agent.node] = agent.node
    if not replicas:
        wanted = ", ".join(f"{k}={v}" for k, v in system.labels.items())
        msg = f"no online agent has the labels {wanted}: `aftershock agents` lists them"
        raise RunFailed(msg)
    return replicas, hosts


def _selector(target: TargetSpec) -> Selector:
    return Selector(
        nodes=tuple(target.nodes),
        site=target.sites[0] if len(target.sites) == 1 else None,
        labels=dict(target.labels),
        count=target.count,
        percent=target.percent,
    )


def fault_name(phase: Phase, index: int, step: FaultStep) -> str:
    """How journal, report and findings call a fault: `phase.name`."""
    return f"{phase.name}.{step.name or f'{step.type}-{index}'}"


def plan_experiment(experiment: Experiment, fleet: FleetView) -> list[PlannedFault]:
    """Resolve every fault's targets against `fleet` without sending anything:
    what `--dry-run` shows. A fault no agent can run is listed as skipped."""
    planned = []
    for phase in experiment.method:
        for index, step in enumerate(phase.faults):
            name = fault_name(phase, index, step)
            try:
                agents = resolve_targets(fleet, _selector(step.target), step.type)
            except MissingCapability as exc:
                planned.append(
                    PlannedFault(
                        phase.name, name, step.type, step.duration, (), str(exc)
                    )
                )
                continue
            except Refused as exc:
                raise RunFailed(str(exc)) from None
            nodes = tuple(a.node for a in agents)
            planned.append(
                PlannedFault(phase.name, name, step.type, step.duration, nodes)
            )
    return planned


# The stage whose requests no figure counts.
WARMUP: Final = "warmup"


class Run:
    """One run of an experiment; `run_experiment` is the way to start it."""

    def __init__(
        self,
        experiment: Experiment,
        connector: Connector,
        *,
        signer: Signer = sign,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.experiment = experiment
        self.connector = connector
        self.signer = signer
        self.on_progress = progress
        self.clock = Clock()
        self.journal = Journal(self.clock, experiment.name)
        self.windows: list[FaultWindow] = []
        self.active: dict[str, str] = {}
        self.telemetry = TelemetryProbe(self.clock)
        self.stage = "starting"
        self.abort_reason: str | None = None
        self.load: LoadGenerator | None = None
        self.drift: DriftProbe | None = None
        self.hosts: dict[str, str] = {}
        self.after_recovery: float | None = None
        self.last_revert: float | None = None
        self.notes: list[Finding] = []
        self.service: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------- the run

    async def execute(self) -> RunResult:
        """Carry the experiment out and return what it established."""
        outcome: Outcome = "held"
        reason = ""
        self.journal.record("run_started", experiment=self.experiment.name)
        try:
            async with (
                self.connector() as transport,
                Coordinator(transport, signer=self.signer) as coordinator,
            ):
                await self._run(coordinator)
        except _Aborted:
            outcome, reason = "aborted", f"aborted: {self.abort_reason}"
        except (RunFailed, BrokerUnreachable, ConnectionLost) as exc:
            outcome, reason = "failed", str(exc)
        except ExceptionGroup as group:
            # Parallel faults of a phase fail together in a group.
            failures = group.subgroup((RunFailed, BrokerUnreachable, ConnectionLost))
            if failures is None:
                raise
            outcome, reason = "failed", "; ".join(str(e) for e in failures.exceptions)
        finally:
            if self.load is not None:
                self.load.stop()
        # Judged first: a run that completed ("held" so far) may still have
        # violated the hypothesis, and the journal must say the final word.
        result = self.result(outcome, reason)
        self.journal.record("run_ended", outcome=result.outcome, reason=reason)
        return result

    async def _run(self, coordinator: Coordinator) -> None:
        experiment = self.experiment
        fleet = await coordinator.snapshot()
        replicas, self.hosts = resolve_replicas(experiment, fleet)
        planned = plan_experiment(experiment, fleet)
        self.journal.record(
            "plan",
            replicas={r.name: r.url for r in replicas},
            faults=[
                {"name": p.name, "nodes": list(p.nodes), "skipped": p.skipped}
                for p in planned
            ],
        )

        keys = experiment.load.keys.names()
        self.load = LoadGenerator(
            replicas,
            keys,
            experiment.load.rate,
            self.clock,
            method=experiment.load.request,
            path=experiment.load.path,
            timeout_s=experiment.load.timeout,
            connections=experiment.load.connections,
            connection_max_age_s=experiment.load.connection_max_age,
        )
        step = max(1, len(keys) // experiment.drift.keys)
        self.drift = DriftProbe(
            replicas, keys[::step][: experiment.drift.keys], self.clock
        )

        with coordinator.listen() as inbox:
            await coordinator.transport.subscribe(wire.TELEMETRY_WILDCARD)
            # Plain tasks, not a TaskGroup: an abort must reach `execute` as
            # itself, not wrapped in an exception group.
            load = asyncio.create_task(self.load.run(experiment.load.duration))
            background = [
                asyncio.create_task(self._watch_telemetry(inbox.get)),
                asyncio.create_task(self._sample_drift()),
            ]
            before = await self._scrape(replicas)
            try:
                await self._stages(coordinator)
                self.service = self._service(before, await self._scrape(replicas))
            finally:
                self.load.stop()
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                await load

    async def _stages(self, coordinator: Coordinator) -> None:
        experiment = self.experiment
        self._enter(WARMUP)
        await asyncio.sleep(experiment.warmup)
        await self._observe(analysis.STEADY_BEFORE, experiment.steady_state)
        self._check_steady_state_before()

        method = asyncio.create_task(self._method(coordinator))
        await self._watch(method)

        self.last_revert = self.clock.now()
        await self._recover()

        self.after_recovery = self.clock.now()
        await self._observe("steady-after", experiment.steady_state)

    # ------------------------------------------------------------- stages

    def _enter(self, stage: str) -> None:
        self.stage = stage
        if self.load is not None:
            self.load.phase = stage
        self.journal.record("stage", stage=stage)
        self._report_progress()

    async def _observe(self, stage: str, seconds: float) -> None:
        """Stay in `stage` for `seconds`, checking the aborts meanwhile."""
        self._enter(stage)
        until = self.clock.now() + seconds
        while (left := until - self.clock.now()) > 0:
            await asyncio.sleep(min(left, self.experiment.check_interval))
            self._check()

    def _check_steady_state_before(self) -> None:
        assert self.load is not None
        records = [r for r in self.load.records if r.phase == analysis.STEADY_BEFORE]
        hypothesis = self.experiment.hypothesis
        if not records:
            msg = "no request was answered in the steady state before any fault"
            raise RunFailed(msg)

        p99 = analysis.p99_ms(records) or 0.0
        errors = analysis.error_rate(records) * 100
        if p99 > hypothesis.p99_ms or errors > hypothesis.error_rate_pct:
            missed = (
                f"the system missed its hypothesis before any fault (p99 {p99:.1f} "
                f"ms, errors {errors:.2f} %)"
            )
            if self.experiment.require_steady_state:
                msg = f"{missed}: fix the steady state first, a run would prove nothing"
                raise RunFailed(msg)
            self.journal.record(
                "steady_state_missed", p99_ms=p99, error_rate_pct=errors
            )
            self.notes.append(
                Finding(
                    "steady-state-missed",
                    f"{missed}; the run went on (require_steady_state: false), so "
                    "violations may not be the faults' doing",
                    "note",
                )
            )
            return
        self.journal.record("steady_state_ok", p99_ms=p99, error_rate_pct=errors)

    async def _watch(self, method: asyncio.Task[None]) -> None:
        """Check the aborts every interval until the method ends; on abort,
        cancel it, which reverts every fault it holds."""
        try:
            while not method.done():
                await asyncio.wait({method}, timeout=self.experiment.check_interval)
                self._check()
        except _Aborted:
            method.cancel()
            await asyncio.gather(method, return_exceptions=True)
            self.journal.record("aborted_and_reverted", reason=self.abort_reason)
            raise
        finally:
            if not method.done():
                method.cancel()
                await asyncio.gather(method, return_exceptions=True)
        method.result()

    async def _method(self, coordinator: Coordinator) -> None:
        for phase in self.experiment.method:
            self._enter(phase.name)
            steps = [
                self._fault(coordinator, phase, index, step)
                for index, step in enumerate(phase.faults)
            ]
            if phase.mode == "parallel":
                async with asyncio.TaskGroup() as group:
                    for step in steps:
                        group.create_task(step)
            else:
                for step in steps:
                    await step
            if phase.settle:
                await asyncio.sleep(phase.settle)

    async def _fault(
        self, coordinator: Coordinator, phase: Phase, index: int, step: FaultStep
    ) -> None:
        """Inject one fault, hold it for its duration, revert it (always)."""
        name = fault_name(phase, index, step)
        request = InjectRequest(
            fault=step.fault,
            duration_s=step.duration,
            lease_s=self.experiment.lease,
            experiment=self.experiment.name,
            selector=_selector(step.target),
        )
        fleet = await coordinator.snapshot()
        try:
            plan = plan_inject(fleet, request, self.signer)
        except MissingCapability as exc:
            self._skip(name, phase, step, str(exc))
            return
        except Refused as exc:
            raise RunFailed(f"{name}: {exc}") from None

        # The window opens before the command leaves: an agent acts as soon
        # as it receives it, before its ack comes back.
        start = self.clock.now()
        nodes: tuple[str, ...] = ()
        try:
            async with coordinator.inject(
                plan, ack_timeout_s=self.experiment.ack_timeout
            ) as injection:
                results = injection.results.values()
                nodes = tuple(r.node for r in results if r.state == "applied")
                refused = {
                    r.node: f"{r.state}: {r.reason}"
                    for r in results
                    if r.node not in nodes
                }
                self.journal.record(
                    "fault_applied" if nodes else "fault_refused",
                    fault=name,
                    fault_id=plan.fault_id,
                    nodes=list(nodes),
                    refused=refused,
                    detail={r.node: r.detail for r in results if r.detail},
                )
                if not nodes:
                    reasons = "; ".join(f"{n} {why}" for n, why in refused.items())
                    self._skip(name, phase, step, f"no agent applied it ({reasons})")
                    return
                self.active[name] = ",".join(nodes)
                await injection.hold(step.duration)
        finally:
            if nodes:
                self.active.pop(name, None)
                end = self.clock.now()
                self.journal.record("fault_reverted", fault=name, nodes=list(nodes))
                self.windows.append(self._window(name, phase, step, start, end, nodes))

    def _window(
        self,
        name: str,
        phase: Phase,
        step: FaultStep,
        start: float,
        end: float | None,
        nodes: tuple[str, ...],
        skipped: str | None = None,
    ) -> FaultWindow:
        hit = tuple(sorted(r for r, node in self.hosts.items() if node in nodes))
        return FaultWindow(name, phase.name, step.type, start, end, nodes, hit, skipped)

    def _skip(self, name: str, phase: Phase, step: FaultStep, reason: str) -> None:
        now = self.clock.now()
        self.journal.record("fault_skipped", fault=name, reason=reason)
        self.windows.append(self._window(name, phase, step, now, now, (), reason))

    async def _recover(self) -> None:
        """Sample drift until it stays under target for `stable_for`, or the
        recovery window ends; aborts are still checked."""
        self._enter("recovery")
        recovery = self.experiment.recovery
        started = self.clock.now()
        target = recovery.drift_pct / 100
        while self.clock.now() - started < recovery.max:
            await asyncio.sleep(self.experiment.check_interval)
            self._check()
            points = analysis.drift_series(self.drift.samples if self.drift else [])
            converged = analysis.time_to_converge(points, started, target)
            if converged is not None and points[-1][0] - (started + converged) >= (
                recovery.stable_for
            ):
                self.journal.record("converged", seconds=round(converged, 3))
                return
        self.journal.record("recovery_window_ended", seconds=recovery.max)

    async def _scrape(self, replicas: list[Replica]) -> dict[str, Samples]:
        """Each replica's /metrics, or nothing for one that does not answer."""
        path = self.experiment.system.metrics_path
        if path is None:
            return {}
        scraped: dict[str, Samples] = {}
        async with aiohttp.ClientSession() as http:
            for replica in replicas:
                try:
                    scraped[replica.name] = await scrape_metrics(
                        http, replica.url.rstrip("/") + path
                    )
                except ProbeError as exc:
                    self.journal.record(
                        "metrics_unavailable", replica=replica.name, error=str(exc)
                    )
        return scraped

    def _service(
        self, before: dict[str, Samples], after: dict[str, Samples]
    ) -> dict[str, dict[str, float]]:
        figures = {
            name: service_deltas(before.get(name, {}), samples)
            for name, samples in after.items()
        }
        self.journal.record("service_metrics", replicas=figures)
        return figures

    # ---------------------------------------------------------- background

    async def _sample_drift(self) -> None:
        assert self.drift is not None
        async with aiohttp.ClientSession() as http:
            while True:
                await self.drift.sample(http)
                await asyncio.sleep(self.experiment.drift.interval)

    async def _watch_telemetry(
        self, next_message: Callable[[], Awaitable[Received]]
    ) -> None:
        while True:
            self.telemetry.take(await next_message())

    # -------------------------------------------------------------- checks

    def _check(self) -> None:
        """Raise _Aborted when an abort condition holds; report progress."""
        assert self.load is not None
        now = self.clock.now()
        self._report_progress()

        for condition in self.experiment.abort:
            window = self.load.recent(now - condition.window)
            if len(window) < condition.min_requests:
                continue
            if condition.metric == "p99_ms":
                value = analysis.p99_ms(window) or 0.0
            else:
                value = analysis.error_rate(window) * 100
            if value > condition.above:
                self.abort_reason = (
                    f"{condition.metric} {value:.2f} over the last "
                    f"{condition.window:g}s exceeded {condition.above:g}"
                )
                self.journal.record("abort", reason=self.abort_reason, stage=self.stage)
                raise _Aborted

    def _report_progress(self) -> None:
        if self.on_progress is None or self.load is None:
            return
        now = self.clock.now()
        recent = self.load.recent(now - self.experiment.check_interval)
        drift = analysis.drift_series(self.drift.samples[-20:] if self.drift else [])
        self.on_progress(
            Progress(
                self.stage,
                now,
                len(self.load.records),
                analysis.p99_ms(recent),
                analysis.error_rate(recent) * 100,
                drift[-1][1] * 100 if drift else None,
                tuple(sorted(self.active)),
            )
        )

    # -------------------------------------------------------------- result

    def result(self, outcome: Outcome, reason: str) -> RunResult:
        """What the run established so far, judged as `outcome`."""
        hypothesis = self.experiment.hypothesis
        records = self.load.records if self.load is not None else []
        records = [r for r in records if r.phase != WARMUP]
        samples = self.drift.samples if self.drift is not None else []
        windows = sorted(self.windows, key=lambda w: w.start)
        result = RunResult(
            experiment=self.experiment.name,
            outcome=outcome,
            started_at=self.clock.wall_origin,
            duration_s=self.clock.now(),
            hypothesis=hypothesis.model_dump(),
            windows=windows,
            records=records,
            drift=samples,
            telemetry=self.telemetry.points,
            events=self.journal.events,
            description=self.experiment.description,
            reason=reason,
            service=self.service,
        )
        if outcome == "failed":
            return result

        result.verdicts = analysis.evaluate(
            records,
            samples,
            p99_target_ms=hypothesis.p99_ms,
            error_target_pct=hypothesis.error_rate_pct,
            drift_target_pct=hypothesis.drift_pct,
            after_recovery=self.after_recovery,
        )
        if self.last_revert is not None:
            points = analysis.drift_series(samples)
            target = self.experiment.recovery.drift_pct / 100
            result.converge_s = analysis.time_to_converge(
                points, self.last_revert, target
            )
        result.findings = analysis.find(
            records,
            windows,
            result.verdicts,
            samples,
            p99_target_ms=hypothesis.p99_ms,
            error_target_pct=hypothesis.error_rate_pct,
            converge_s=result.converge_s,
        )
        result.findings = self.notes + result.findings
        if outcome == "held" and not all(v.held for v in result.verdicts):
            result.outcome = "violated"
        return result


async def run_experiment(
    experiment: Experiment,
    connector: Connector,
    *,
    report_dir: Path | None = None,
    signer: Signer = sign,
    progress: ProgressCallback | None = None,
) -> RunResult:
    """Run `experiment` against the fleet behind `connector` and write the
    report into `report_dir` when given. Never raises for what the run found:
    the result's outcome and exit code say it."""
    run = Run(experiment, connector, signer=signer, progress=progress)
    try:
        result = await run.execute()
    except asyncio.CancelledError:
        # Ctrl-C: the faults were reverted on the way out (each injection's
        # finally); still leave a report of what was seen, then stop.
        run.journal.record("interrupted")
        result = run.result("aborted", "interrupted: every fault was reverted")
        if report_dir is not None:
            write_report(result, report_dir)
        raise
    if report_dir is not None:
        write_report(result, report_dir)
    return result
