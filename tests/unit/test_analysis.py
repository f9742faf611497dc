"""Analysis functions on synthetic records: every figure is computed by hand."""

from __future__ import annotations

import pytest

from coordinator.analysis import (
    SLO_DRIFT,
    SLO_ERRORS,
    SLO_LATENCY,
    DriftSample,
    FaultWindow,
    Finding,
    drift_series,
    error_rate,
    evaluate,
    find,
    p99_ms,
    per_phase,
    per_replica,
    percentile,
    time_to_converge,
)
from coordinator.load import RequestRecord


def _record(
    t: float,
    latency_ms: float = 10.0,
    *,
    replica: str = "a",
    phase: str = "p",
    status: int = 200,
    error: str | None = None,
) -> RequestRecord:
    return RequestRecord(t, replica, phase, "k", status, latency_ms / 1000, error)


def _drift(t: float, a: float, b: float, c: float, key: str = "k") -> DriftSample:
    return DriftSample(t, key, {"a": a, "b": b, "c": c}, capacity=100.0)


def test_percentile_is_nearest_rank() -> None:
    """Test that p99 of 1..100 is 99 and p50 of 1..4 is 2 (no interpolation)."""
    assert percentile(range(1, 101), 99) == 99
    assert percentile([4, 1, 3, 2], 50) == 2
    assert percentile([7.5], 99) == 7.5
    assert percentile([], 99) is None


def test_p99_counts_the_slow_tail() -> None:
    """Test that two slow requests in a hundred set p99 in milliseconds."""
    records = [_record(i, 10) for i in range(98)] + [_record(98, 500), _record(99, 900)]

    assert p99_ms(records) == pytest.approx(500)


def test_error_rate_counts_5xx_and_transport_not_429() -> None:
    """Test that 429 is no error while 503 and a timeout are."""
    records = [
        _record(0, status=200),
        _record(1, status=429),
        _record(2, status=429),
        _record(3, status=503),
        _record(4, status=0, error="timeout"),
    ]

    assert error_rate(records) == pytest.approx(2 / 5)
    assert error_rate([]) == 0.0


def test_breakdown_per_replica_and_phase() -> None:
    """Test that p99 and error rate split by replica and by phase."""
    records = [_record(i, 10, replica="a", phase="steady") for i in range(10)]
    records += [_record(i, 300, replica="b", phase="fault") for i in range(10)]
    records.append(_record(20, 5, replica="b", phase="fault", status=500))

    replicas = per_replica(records)
    phases = per_phase(records)

    assert replicas["a"].p99_ms == pytest.approx(10)
    assert replicas["b"].p99_ms == pytest.approx(300)
    assert phases["fault"].requests == 11
    assert phases["fault"].error_rate == pytest.approx(1 / 11)
    assert phases["steady"].error_rate == 0.0


def test_drift_is_worst_key_over_capacity() -> None:
    """Test that drift is (max - min) / capacity, the worst key per moment."""
    samples = [_drift(1, 90, 80, 85, key="x"), _drift(1, 50, 50, 50, key="y")]
    samples.append(_drift(2, 10, 10, 12))

    assert samples[0].drift == pytest.approx(0.10)
    series = drift_series(samples)

    assert [t for t, _ in series] == [1, 2]
    assert [d for _, d in series] == pytest.approx([0.10, 0.02])


def test_drift_ignores_a_lone_answer() -> None:
    """Test that a key only one replica answered shows no drift."""
    assert DriftSample(0, "k", {"a": 3.0}, 100.0).drift == 0.0


def test_time_to_converge_waits_until_drift_stays_under() -> None:
    """Test that convergence is the moment after which drift stays under
    target, measured from the revert, ignoring a dip that did not last."""
    drift = [(9, 0.5), (10, 0.4), (11, 0.01), (12, 0.3), (13, 0.015), (14, 0.0)]

    assert time_to_converge(drift, since=10, target=0.02) == pytest.approx(3)


def test_time_to_converge_is_none_when_drift_ends_high() -> None:
    """Test that no convergence is reported while the last sample is over."""
    assert time_to_converge([(1, 0.0), (2, 0.5)], since=0, target=0.02) is None
    assert time_to_converge([(1, 0.0)], since=5, target=0.02) is None


def _verdicts(
    records: list[RequestRecord], samples: list[DriftSample], after: float | None = 10
) -> dict[str, bool]:
    found = evaluate(
        records,
        samples,
        p99_target_ms=120,
        error_target_pct=0.1,
        drift_target_pct=2.0,
        after_recovery=after,
    )
    return {v.slo: v.held for v in found}


def test_verdicts_hold_on_a_healthy_run() -> None:
    """Test that fast answers, only 429s and converged drift hold all SLOs."""
    records = [_record(i, 20, status=429 if i % 2 else 200) for i in range(1000)]
    samples = [_drift(5, 0, 50, 0), _drift(11, 40, 41, 40)]

    assert _verdicts(records, samples) == {
        SLO_LATENCY: True,
        SLO_ERRORS: True,
        SLO_DRIFT: True,
    }


def test_verdicts_fail_each_slo_on_its_own_evidence() -> None:
    """Test that slow tail, 0.2 % errors and late drift each violate their SLO."""
    records = [_record(i, 20) for i in range(1000)]
    for i in range(20):
        records[i] = _record(i, 200)
    records[500] = _record(500, status=502)
    records[501] = _record(501, status=0, error="ClientConnectionError")
    samples = [_drift(11, 40, 45, 40)]

    assert _verdicts(records, samples) == {
        SLO_LATENCY: False,
        SLO_ERRORS: False,
        SLO_DRIFT: False,
    }


def test_drift_before_recovery_does_not_count() -> None:
    """Test that drift during the faults is not held against the SLO."""
    samples = [_drift(5, 0, 90, 0), _drift(12, 50, 50, 51)]

    assert _verdicts([_record(0)], samples, after=10)[SLO_DRIFT] is True


def test_one_unlucky_drift_read_does_not_fail_the_slo() -> None:
    """Test that the drift SLO judges the median moment after recovery, so
    one read with a take in flight does not decide it, while a replica that
    stays apart does."""
    blip = [_drift(11, 50, 50, 50), _drift(12, 50, 47, 50), _drift(13, 50, 50, 51)]
    apart = [_drift(11, 50, 40, 50), _drift(12, 50, 40, 50), _drift(13, 50, 50, 50)]

    assert _verdicts([_record(0)], blip)[SLO_DRIFT] is True
    assert _verdicts([_record(0)], apart)[SLO_DRIFT] is False


def test_no_drift_sample_fails_the_drift_slo() -> None:
    """Test that an unmeasured drift is not taken as held."""
    assert _verdicts([_record(0)], [])[SLO_DRIFT] is False


def _all_findings(
    records: list[RequestRecord],
    windows: list[FaultWindow],
    samples: list[DriftSample] | None = None,
    after: float = 100,
) -> list[Finding]:
    samples = samples or [_drift(after, 1, 1, 1)]
    verdicts = evaluate(
        records,
        samples,
        p99_target_ms=120,
        error_target_pct=0.1,
        drift_target_pct=2.0,
        after_recovery=after,
    )
    return find(
        records, windows, verdicts, samples, p99_target_ms=120, error_target_pct=0.1
    )


def _findings(
    records: list[RequestRecord],
    windows: list[FaultWindow],
    samples: list[DriftSample] | None = None,
    after: float = 100,
) -> dict[str, str]:
    """Findings by kind (the last one of a kind wins)."""
    return {f.kind: f.text for f in _all_findings(records, windows, samples, after)}


def test_latency_only_on_faulted_replica_blames_its_network_path() -> None:
    """Test that a slow faulted replica and fast others give the
    network-path finding naming the replica."""
    window = FaultWindow("slow-a", "p1", "latency", 10, 20, ("edge-1",), ("a",))
    records = [_record(t / 10, 10, replica=r) for t in range(300) for r in "abc"]
    records += [_record(15, 210, replica="a") for _ in range(50)]

    found = _findings(records, [window])

    assert "its network path" in found["latency-on-faulted-replica"]
    assert " a " in found["latency-on-faulted-replica"]


def test_replica_slow_before_any_fault_is_not_blamed_on_it() -> None:
    """Test that a replica already as slow in the steady state does not make
    a fault's latency finding."""
    window = FaultWindow("squeeze", "p1", "cpu", 10, 20, ("edge-1",), ("a",))
    records = [_record(t, 300, replica="b", phase="steady-before") for t in range(9)]
    records += [_record(15, 10, replica="a") for _ in range(10)]
    records += [_record(15, 320, replica="b") for _ in range(10)]

    found = _findings(records, [window])

    assert not {"latency-spread", "latency-during-fault"} & set(found)


def test_latency_on_untouched_replicas_is_a_spread() -> None:
    """Test that slowness on replicas the fault did not touch is reported
    as a spread, not blamed on the faulted one."""
    window = FaultWindow("slow-a", "p1", "latency", 10, 20, ("edge-1",), ("a",))
    records = [_record(15, 300, replica=r) for r in "abc" for _ in range(10)]

    assert "latency-spread" in _findings(records, [window])


def test_5xx_during_cpu_pressure_points_at_resource_limits() -> None:
    """Test that errors inside a CPU fault window give the resource finding,
    and none outside it."""
    window = FaultWindow("squeeze", "p1", "cpu", 10, 20, ("edge-1",), ("a",))
    records = [_record(t / 10) for t in range(300)]
    records += [_record(12, status=503) for _ in range(5)]

    found = _findings(records, [window])

    assert "resource limits" in found["errors-under-resource-pressure"]
    assert "errors-without-fault" not in found


def test_errors_before_any_fault_are_the_systems_own() -> None:
    """Test that errors before the first fault are reported as the system's
    own, not blamed on a fault."""
    window = FaultWindow("squeeze", "p1", "cpu", 10, 20)
    records = [_record(t / 10) for t in range(300)]
    records += [_record(5, status=500) for _ in range(5)]

    found = _findings(records, [window])

    assert "errors-without-fault" in found
    assert "errors-under-resource-pressure" not in found
    assert "errors-after-fault" not in found


def test_errors_after_a_fault_ended_say_it_did_not_recover() -> None:
    """Test that errors after a window closed name that fault and how long
    after it the last one came."""
    window = FaultWindow("kill-b", "p1", "process", 10, 20, ("edge-2",), ("b",))
    records = [_record(t / 10) for t in range(300)]
    records += [_record(23, replica="b", status=0, error="refused") for _ in range(5)]

    found = _findings(records, [window])

    assert "after kill-b (process) ended, the last 3.0 s" in found["errors-after-fault"]
    assert "errors-without-fault" not in found


def test_drift_after_restart_points_at_the_merge() -> None:
    """Test that drift left after a process fault blames the merge and
    names the odd replica."""
    window = FaultWindow("kill-b", "p1", "process", 10, 20, ("edge-2",), ("b",))
    samples = [_drift(100, 50, 20, 50)]

    found = _findings([_record(0)], [window], samples)

    assert "merge" in found["drift-after-state-fault"]
    assert "replica b holds 20" in found["drift-after-state-fault"]


def test_drift_without_state_fault_points_at_gossip() -> None:
    """Test that drift with no state fault in the run blames gossip."""
    samples = [_drift(100, 50, 40, 50)]

    found = _findings([_record(0)], [], samples)

    assert "gossip" in found["drift-not-converged"]


def test_skipped_fault_is_a_note_with_its_reason() -> None:
    """Test that a fault the agents could not apply is reported, with why."""
    window = FaultWindow("slow-a", "p1", "latency", 10, 10, skipped="no netem")

    found = _findings([_record(0)], [window])

    assert "no netem" in found["fault-skipped"]


def _state_notes(windows: list[FaultWindow], samples: list[DriftSample]) -> list[str]:
    found = _all_findings([_record(0)], windows, samples)
    return [f.text for f in found if f.kind == "state-fault-drift"]


def test_state_fault_drift_says_how_far_and_how_soon_it_healed() -> None:
    """Test that a corruption the merge repaired is reported with its peak and
    the time back under target, counting only samples before the next
    fault."""
    corrupt = FaultWindow("zero-b", "p1", "corrupt-state", 10, 20, ("e2",), ("b",))
    kill = FaultWindow("kill-c", "p2", "process", 30, 40, ("e3",), ("c",))
    samples = [
        _drift(11, 50, 20, 50),
        _drift(12, 50, 45, 50),
        _drift(13, 50, 49, 50),
        # During the next fault: not the corruption's.
        _drift(31, 50, 50, 0),
        _drift(100, 50, 50, 50),
    ]

    notes = _state_notes([corrupt, kill], samples)

    assert "reached 30 % during zero-b" in notes[0]
    assert "2.0 s later" in notes[0]
    assert "reached 50 % during kill-c" in notes[1]


def test_state_fault_drift_never_seen_is_said_plainly() -> None:
    """Test that a state fault whose samples all stayed under target gets a
    note that says so, rather than nothing."""
    corrupt = FaultWindow("zero-b", "p1", "corrupt-state", 10, 20, ("e2",), ("b",))
    samples = [_drift(t, 50, 50, 50) for t in (11, 15, 19, 100)]

    (note,) = _state_notes([corrupt], samples)

    assert "stayed under 2 % during zero-b" in note
    assert "over 3 samples" in note
