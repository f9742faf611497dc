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

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal

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

from chaos_agent.wire import FAULT_TYPES, Fault, LabelKey, LabelValue, Name
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
    # Steady state measured before the first fault and after recovery.
    steady_state: PositiveSeconds = 5.0
    check_interval: PositiveSeconds = 1.0
    # Agents revert on their own when renewals stop for this long.
    lease: PositiveSeconds = 15.0

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
