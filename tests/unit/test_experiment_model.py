"""The experiment model: what a valid file gives, and how errors point at
the line and the field of the file."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from chaos_agent.wire import CpuFault, LatencyFault
from coordinator.experiment import (
    Experiment,
    ExperimentError,
    load_experiment,
    parse_experiment,
)

VALID = """\
name: latency-one-replica
system:
  endpoints:
    - {name: a, url: "http://127.0.0.1:8001", node: edge-1}
    - {name: b, url: "http://127.0.0.1:8002", node: edge-2}
load:
  rate: 50
  keys: {count: 10}
method:
  - name: slow-a
    faults:
      - type: latency
        params: {delay_ms: 200, jitter_ms: 20, engine: proxy, ports: [8001]}
        target: {nodes: [edge-1]}
        duration: 30s
  - name: squeeze
    mode: serial
    faults:
      - type: cpu
        params: {load_percent: 80}
        duration: 10s
      - type: cpu
        params: {load_percent: 50}
        duration: 500ms
"""


def _problems(text: str) -> list[tuple[int, str, str]]:
    with pytest.raises(ExperimentError) as caught:
        parse_experiment(textwrap.dedent(text), source="x.yaml")
    return caught.value.problems


def test_valid_file_gives_defaults_and_wire_faults() -> None:
    """Test that a valid file parses, durations become seconds, the SLOs
    default to the design's, and params become wire fault models."""
    experiment = parse_experiment(VALID)

    assert isinstance(experiment, Experiment)
    assert (experiment.hypothesis.p99_ms, experiment.hypothesis.error_rate_pct) == (
        120.0,
        0.1,
    )
    assert experiment.hypothesis.drift_pct == 2.0
    fault = experiment.method[0].faults[0].fault
    assert isinstance(fault, LatencyFault)
    assert (fault.delay_ms, fault.jitter_ms, fault.ports) == (200, 20, [8001])
    assert isinstance(experiment.method[1].faults[0].fault, CpuFault)
    assert experiment.method[0].duration == 30.0
    assert experiment.method[1].duration == 10.5
    assert experiment.load.keys.names()[:2] == ["key-0", "key-1"]
    assert [a.metric for a in experiment.abort] == ["error_rate_pct", "p99_ms"]


def test_bad_param_names_its_line_and_field() -> None:
    """Test that a fault parameter out of range is reported at its own line
    with its full path."""
    text = VALID.replace("load_percent: 80", "load_percent: 180")

    problems = _problems(text)

    assert problems == [(20, "method[1].faults[0].params.load_percent", problems[0][2])]
    assert "less than or equal to 100" in problems[0][2]


def test_unknown_field_names_its_line() -> None:
    """Test that an unknown top-level field is refused at its line."""
    problems = _problems(VALID + "surprise: 1\n")

    assert [(line, path) for line, path, _ in problems] == [(25, "surprise")]
    assert "Extra inputs" in problems[0][2]


def test_missing_field_points_at_its_parent() -> None:
    """Test that a missing duration is reported at the fault that lacks it."""
    text = VALID.replace("        duration: 500ms\n", "")

    problems = _problems(text)

    assert [(line, path) for line, path, _ in problems] == [
        (22, "method[1].faults[1].duration")
    ]
    assert "required" in problems[0][2]


def test_duration_without_unit_is_refused() -> None:
    """Test that a bare number is not taken as a duration."""
    problems = _problems(VALID.replace("duration: 30s", "duration: 30"))

    assert problems[0][:2] == (15, "method[0].faults[0].duration")
    assert "unit" in problems[0][2]


def test_unknown_fault_type_lists_the_known_ones() -> None:
    """Test that a fault type the wire protocol lacks is named as such."""
    problems = _problems(VALID.replace("type: latency", "type: meteor"))

    assert problems[0][:2] == (12, "method[0].faults[0].type")
    assert "'cpu'" in problems[0][2]


def test_every_problem_is_reported_at_once() -> None:
    """Test that several problems come back together, each with its line."""
    text = VALID.replace("rate: 50", "rate: -1").replace("delay_ms: 200", "delay_ms: x")

    problems = _problems(text)

    assert {(line, path) for line, path, _ in problems} == {
        (7, "load.rate"),
        (13, "method[0].faults[0].params.delay_ms"),
    }


def test_yaml_syntax_error_names_the_line() -> None:
    """Test that broken YAML is reported with the line of the break."""
    problems = _problems("name: x\nsystem: [unclosed\nload: {}\n")

    assert problems[0][1] == "yaml"
    assert problems[0][0] >= 2


def test_system_needs_endpoints_or_labels() -> None:
    """Test that a system with neither endpoints nor labels is refused."""
    text = VALID.split("system:")[0] + "system: {}\n" + VALID.split("load:", 1)[1]
    text = text.replace("  rate: 50", "load:\n  rate: 50", 1)

    problems = _problems(text)

    assert problems[0][1] == "system"
    assert "endpoints" in problems[0][2]


def test_duplicate_phase_names_are_refused() -> None:
    """Test that two phases with one name are refused."""
    problems = _problems(VALID.replace("name: squeeze", "name: slow-a"))

    assert "unique" in problems[0][2]


def test_message_lists_file_and_line(tmp_path: Path) -> None:
    """Test that the error text reads file:line: field: problem."""
    path = tmp_path / "exp.yaml"
    path.write_text(VALID.replace("rate: 50", "rate: 0"))

    with pytest.raises(ExperimentError, match=r"exp\.yaml:7: load\.rate: "):
        load_experiment(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    """Test that a missing file is reported, not raised as OSError."""
    with pytest.raises(ExperimentError, match="No such file"):
        load_experiment(tmp_path / "nope.yaml")
