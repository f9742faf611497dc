"""What a run's samples say: p99, error rate, drift, convergence, verdicts
and the findings that explain a failure.

Everything here is a pure function over records, so it can be checked on
synthetic data. Definitions (the same as the design's):

- p99 latency uses the nearest-rank method: the smallest sample with at least
  99 % of the samples at or below it. It never interpolates, so the figure is
  always a latency some request really had.
- error rate: 5xx answers and transport errors (timeouts, refused or reset
  connections) over all requests. 429 is a rate limiter's right answer.
- drift: for each sampled key, (max - min) of the replicas' available tokens
  over the bucket's capacity; at one moment, the worst key counts; after
  recovery, the median moment is judged.
- time to converge: from the last revert until drift falls under its target
  and stays there for the rest of the observation.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from coordinator.load import RequestRecord

P99: Final = 99.0

# Fault types whose pressure is on the node's resources.
RESOURCE_FAULTS: Final = frozenset({"cpu", "memory"})
# Fault types that leave replicas with different state to merge.
STATE_FAULTS: Final = frozenset({"process", "corrupt-state"})
NETWORK_FAULTS: Final = frozenset({"latency", "bandwidth", "partition"})

# The phase name the runner gives the steady state before any fault.
STEADY_BEFORE: Final = "steady-before"
# How far over its own steady-state p99 a replica must be, during a fault,
# for the fault to be blamed.
BASELINE_FACTOR: Final = 1.5
# Requests sent this soon after a fault ended still count as the fault's.
AFTER_FAULT_GRACE_S: Final = 1.0


@dataclass(frozen=True)
class DriftSample:
    """One key read from every replica at (nearly) the same moment."""

    t: float
    key: str
    # Available tokens per replica; a replica that did not answer is absent.
    tokens: dict[str, float]
    capacity: float

    @property
    def drift(self) -> float:
        """(max - min) / capacity; 0 when fewer than two replicas answered."""
        if len(self.tokens) < 2 or self.capacity <= 0:
            return 0.0
        values = self.tokens.values()
        return (max(values) - min(values)) / self.capacity


@dataclass(frozen=True)
class FaultWindow:
    """When one fault of the method was active, and where."""

    name: str
    phase: str
    type: str
    start: float
    # None: still active when the run ended (it should never stay None).
    end: float | None
    nodes: tuple[str, ...] = ()
    # Replicas hosted on those nodes, the ones the fault hits directly.
    replicas: tuple[str, ...] = ()
    # Why the fault did not run, when it did not.
    skipped: str | None = None

    def covers(self, t: float) -> bool:
        return self.start <= t and (self.end is None or t < self.end)


@dataclass(frozen=True)
class Verdict:
    """One SLO of the hypothesis: its target, what was observed, and whether
    it held."""

    slo: str
    target: float
    observed: float | None
    unit: str
    held: bool
    detail: str = ""


@dataclass(frozen=True)
class Finding:
    """A fact the run established, worded for the operator who reads it."""

    kind: str
    text: str
    severity: Literal["violation", "note"] = "violation"
    # The SLO it explains, if any.
    slo: str | None = None
    evidence: dict[str, float | str] = field(default_factory=dict)


# --------------------------------------------------------------- percentiles


def percentile(values: Iterable[float], q: float) -> float | None:
    """The nearest-rank `q`-th percentile of `values`; None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    if not 0 < q <= 100:
        msg = f"a percentile lies in (0, 100], got {q}"
        raise ValueError(msg)
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[rank - 1]


def p99_ms(records: Iterable[RequestRecord]) -> float | None:
    """p99 latency in milliseconds of the requests that got an answer or
    failed; failures count with the time they took."""
    value = percentile((r.latency_s for r in records), P99)
    return None if value is None else value * 1000


def error_rate(records: Sequence[RequestRecord]) -> float:
    """Share (0..1) of requests that failed: 5xx or transport error."""
    if not records:
        return 0.0
    return sum(1 for r in records if r.failed) / len(records)


def group_by(
    records: Iterable[RequestRecord], key: Callable[[RequestRecord], str]
) -> dict[str, list[RequestRecord]]:
    groups: dict[str, list[RequestRecord]] = defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    return dict(groups)


@dataclass(frozen=True)
class Breakdown:
    """Requests, p99 and error rate of one slice of the run."""

    requests: int
    p99_ms: float | None
    error_rate: float


def breakdown(records: Sequence[RequestRecord]) -> Breakdown:
    return Breakdown(len(records), p99_ms(records), error_rate(records))


def per_replica(records: Iterable[RequestRecord]) -> dict[str, Breakdown]:
    return {k: breakdown(v) for k, v in group_by(records, lambda r: r.replica).items()}


def per_phase(records: Iterable[RequestRecord]) -> dict[str, Breakdown]:
    return {k: breakdown(v) for k, v in group_by(records, lambda r: r.phase).items()}


def in_window(
    records: Iterable[RequestRecord], window: FaultWindow
) -> list[RequestRecord]:
    return [r for r in records if window.covers(r.t)]


def series(
    records: Sequence[RequestRecord], bucket_s: float = 1.0
) -> list[tuple[float, float | None, float, int]]:
    """(start, p99 ms, error rate, requests) per `bucket_s` of intended send
    time, for plots and live checks."""
    buckets = group_by(records, lambda r: str(int(r.t // bucket_s)))
    rows = []
    for index in sorted(buckets, key=int):
        chunk = buckets[index]
        rows.append(
            (int(index) * bucket_s, p99_ms(chunk), error_rate(chunk), len(chunk))
        )
    return rows


# ---------------------------------------------------------------------- drift


def drift_series(samples: Iterable[DriftSample]) -> list[tuple[float, float]]:
    """(time, worst drift over the keys read at that time), in time order."""
    worst: dict[float, float] = {}
    for sample in samples:
        worst[sample.t] = max(worst.get(sample.t, 0.0), sample.drift)
    return sorted(worst.items())


def time_to_converge(
    drift: Sequence[tuple[float, float]], since: float, target: float
) -> float | None:
    """Seconds from `since` until drift went under `target` (a share, 0..1)
    and stayed there to the last sample; None if the last sample is over it
    or there is no sample after `since`."""
    after = [(t, d) for t, d in drift if t >= since]
    if not after or after[-1][1] > target:
        return None
    converged_at = after[-1][0]
    for t, d in reversed(after):
        if d > target:
            break
        converged_at = t
    return converged_at - since


def outlier_replica(sample: DriftSample) -> tuple[str, float] | None:
    """The replica furthest from the median of the others, and its tokens."""
    if len(sample.tokens) < 2:
        return None
    median = statistics.median(sample.tokens.values())
    name = max(sample.tokens, key=lambda n: abs(sample.tokens[n] - median))
    return name, sample.tokens[name]


# ------------------------------------------------------------------- verdicts

SLO_LATENCY: Final = "p99 latency"
SLO_ERRORS: Final = "error rate"
SLO_DRIFT: Final = "drift after recovery"


def evaluate(
    records: Sequence[RequestRecord],
    drift_samples: Sequence[DriftSample],
    *,
    p99_target_ms: float,
    error_target_pct: float,
    drift_target_pct: float,
    after_recovery: float | None,
) -> list[Verdict]:
    """One verdict per SLO. Drift counts from `after_recovery` on (the
    steady state after the run); without it, the last sampling moment."""
    p99 = p99_ms(records)
    latency = Verdict(
        SLO_LATENCY,
        p99_target_ms,
        p99,
        "ms",
        p99 is not None and p99 <= p99_target_ms,
        f"over {len(records)} requests" if records else "no request was sent",
    )

    failed = sum(1 for r in records if r.failed)
    rate_pct = error_rate(records) * 100
    errors = Verdict(
        SLO_ERRORS,
        error_target_pct,
        rate_pct,
        "%",
        bool(records) and rate_pct <= error_target_pct,
        f"{failed} of {len(records)} requests failed (5xx or transport; 429 not)",
    )

    return [
        latency,
        errors,
        _drift_verdict(drift_samples, drift_target_pct, after_recovery),
    ]


def _drift_verdict(
    samples: Sequence[DriftSample], target_pct: float, after: float | None
) -> Verdict:
    points = drift_series(samples)
    if after is not None:
        points = [(t, d) for t, d in points if t >= after]
    elif points:
        points = points[-1:]
    if not points:
        return Verdict(SLO_DRIFT, target_pct, None, "%", False, "no drift sample")
    # The median moment, not the worst: under live load a take or two is
    # always in flight between gossip rounds, and one unlucky read must not
    # decide the verdict. A replica that stays apart moves the median.
    observed = statistics.median(d for _, d in points) * 100
    worst = max(d for _, d in points) * 100
    return Verdict(
        SLO_DRIFT,
        target_pct,
        observed,
        "%",
        observed <= target_pct,
        f"median of {len(points)} moments after recovery (worst {worst:.3g} %)",
    )


# ------------------------------------------------------------------- findings


def find(
    records: Sequence[RequestRecord],
    windows: Sequence[FaultWindow],
    verdicts: Sequence[Verdict],
    drift_samples: Sequence[DriftSample],
    *,
    p99_target_ms: float,
    error_target_pct: float,
    converge_s: float | None = None,
) -> list[Finding]:
    """Findings that explain the verdicts: which fault, which replica, and
    what the pattern usually means."""
    held = {v.slo: v.held for v in verdicts}
    found: list[Finding] = []
    baseline = {
        name: b.p99_ms
        for name, b in per_replica(
            r for r in records if r.phase == STEADY_BEFORE
        ).items()
        if b.p99_ms is not None
    }

    for window in windows:
        if window.skipped:
            found.append(_skipped(window))
            continue
        chunk = in_window(records, window)
        found += _latency_findings(window, chunk, p99_target_ms, baseline)
        found += _error_findings(window, chunk, error_target_pct)

    found += _steady_state_errors(records, windows, error_target_pct)
    drift_target = next((v.target for v in verdicts if v.slo == SLO_DRIFT), None)
    if drift_target is not None:
        found += [
            _state_fault_drift(window, windows, drift_samples, drift_target / 100)
            for window in windows
            if window.type in STATE_FAULTS and not window.skipped
        ]
    if not held.get(SLO_DRIFT, True):
        found.append(_drift_finding(windows, drift_samples))
    if converge_s is not None:
        found.append(
            Finding(
                "converged",
                f"drift converged {converge_s:.1f} s after the last revert",
                "note",
                SLO_DRIFT,
                {"seconds": round(converge_s, 2)},
            )
        )
    return found


def _skipped(window: FaultWindow) -> Finding:
    return Finding(
        "fault-skipped",
        f"{window.name} ({window.type}) did not run: {window.skipped}; "
        "the hypothesis is untested against it",
        "note",
        evidence={"fault": window.name},
    )


def _latency_findings(
    window: FaultWindow,
    chunk: Sequence[RequestRecord],
    target_ms: float,
    baseline: dict[str, float],
) -> list[Finding]:
    """A replica is slow in a window when its p99 is over target and also
    clearly over its own steady state (a replica that was already slow before
    any fault says nothing about this fault)."""
    replicas = per_replica(chunk)
    slow = {
        n
        for n, b in replicas.items()
        if b.p99_ms is not None
        and b.p99_ms > max(target_ms, BASELINE_FACTOR * baseline.get(n, 0.0))
    }
    if not slow:
        return []

    faulted = set(window.replicas)
    figures: dict[str, float | str] = {
        n: round(b.p99_ms, 1) for n, b in replicas.items() if b.p99_ms is not None
    }
    listing = ", ".join(f"{n} {v} ms" for n, v in sorted(figures.items()))
    if faulted and slow <= faulted and slow != set(replicas):
        cause = (
            "its network path"
            if window.type in NETWORK_FAULTS
            else "the faulted node itself"
        )
        text = (
            f"p99 over {target_ms:g} ms only on {', '.join(sorted(slow))} during "
            f"{window.name} ({window.type}), the faulted replica ({listing}): the "
            f"latency comes from {cause}; clients keep sending to a slow replica "
            "instead of routing around it"
        )
        return [
            Finding(
                "latency-on-faulted-replica", text, slo=SLO_LATENCY, evidence=figures
            )
        ]

    if faulted and slow - faulted:
        text = (
            f"{window.name} ({window.type}) on {', '.join(sorted(faulted))} slowed "
            f"replicas it did not touch ({listing}): they share something with the "
            "faulted one (gossip on the request path, a common host or dependency)"
        )
        return [Finding("latency-spread", text, slo=SLO_LATENCY, evidence=figures)]

    text = f"p99 over {target_ms:g} ms during {window.name} ({window.type}): {listing}"
    return [Finding("latency-during-fault", text, slo=SLO_LATENCY, evidence=figures)]


def _error_findings(
    window: FaultWindow, chunk: Sequence[RequestRecord], target_pct: float
) -> list[Finding]:
    rate_pct = error_rate(chunk) * 100
    if not chunk or rate_pct <= target_pct:
        return []

    failed = [r for r in chunk if r.failed]
    server = sum(1 for r in failed if r.error is None)
    evidence: dict[str, float | str] = {
        "error_rate_pct": round(rate_pct, 3),
        "failed": len(failed),
        "5xx": server,
        "transport": len(failed) - server,
    }
    where = f"during {window.name} ({window.type}"
    where += f" on {', '.join(window.nodes)})" if window.nodes else ")"
    if window.type in RESOURCE_FAULTS:
        text = (
            f"{len(failed)} failed requests ({rate_pct:.2f} %) {where}: the "
            "service runs into its resource limits (worker pool, timeouts, memory) "
            "and fails instead of shedding load with 429"
        )
        return [
            Finding(
                "errors-under-resource-pressure",
                text,
                slo=SLO_ERRORS,
                evidence=evidence,
            )
        ]
    if window.type == "process":
        text = (
            f"{len(failed)} failed requests ({rate_pct:.2f} %) {where}: requests "
            "sent to the stopped replica fail; clients neither retry on another "
            "replica nor stop sending to it"
        )
        return [
            Finding("errors-on-process-loss", text, slo=SLO_ERRORS, evidence=evidence)
        ]
    text = f"{len(failed)} failed requests ({rate_pct:.2f} %) {where}"
    return [Finding("errors-during-fault", text, slo=SLO_ERRORS, evidence=evidence)]


def _steady_state_errors(
    records: Sequence[RequestRecord], windows: Sequence[FaultWindow], target_pct: float
) -> list[Finding]:
    """Errors while no fault was active: before the first fault they are the
    system's own; after one they mean it had not recovered yet."""
    active = [w for w in windows if not w.skipped]
    outside = [r for r in records if not any(_near(w, r.t) for w in active)]
    first = min((w.start for w in active), default=float("inf"))
    found = []

    before = [r for r in outside if r.t < first]
    rate_pct = error_rate(before) * 100
    if rate_pct > target_pct:
        text = (
            f"{rate_pct:.2f} % of the requests sent before any fault failed: the "
            "system misses its error budget on its own"
        )
        evidence: dict[str, float | str] = {"error_rate_pct": round(rate_pct, 3)}
        found.append(
            Finding("errors-without-fault", text, slo=SLO_ERRORS, evidence=evidence)
        )

    after = [r for r in outside if r.t >= first]
    failed = [r for r in after if r.failed]
    if error_rate(after) * 100 > target_pct:
        last = failed[-1]
        ended = [w for w in active if w.end is not None and w.end <= last.t]
        cause = max(ended, key=lambda w: w.end or 0.0) if ended else None
        after_what = (
            f"after {cause.name} ({cause.type}) ended" if cause else "after faults"
        )
        lasted = last.t - cause.end if cause and cause.end is not None else 0.0
        text = (
            f"{len(failed)} requests failed {after_what}, the last {lasted:.1f} s "
            f"after it (replica {last.replica}): the system did not recover when "
            "the fault was lifted (slow restart, no readiness check, clients "
            "still sending to it)"
        )
        evidence = {"failed": len(failed), "seconds_after": round(lasted, 2)}
        found.append(
            Finding("errors-after-fault", text, slo=SLO_ERRORS, evidence=evidence)
        )
    return found


def _near(window: FaultWindow, t: float) -> bool:
    """Inside the window, or sent within the grace after it: a request sent
    as the revert goes out still meets the fault."""
    end = None if window.end is None else window.end + AFTER_FAULT_GRACE_S
    return window.start <= t and (end is None or t < end)


def _state_fault_drift(
    window: FaultWindow,
    windows: Sequence[FaultWindow],
    samples: Sequence[DriftSample],
    target: float,
) -> Finding:
    """How far a state fault pushed the replicas apart and how soon they
    agreed again: the drift SLO judges only after recovery, so without this
    a fault the merge repaired at once looks like a fault that did nothing."""
    # The peak is looked for while the fault is active, the healing until
    # the next fault begins: that one's drift is not this one's.
    later = [w.start for w in windows if w.start > window.start]
    until = min(later, default=math.inf)
    end = until if window.end is None else min(window.end, until)
    series = [(t, d) for t, d in drift_series(samples) if window.start <= t < until]
    points = [(t, d) for t, d in series if t <= end]
    name = f"{window.name} ({window.type})"
    if not points:
        return Finding(
            "state-fault-drift",
            f"no drift sample during {name}: its effect on the replicas' "
            "agreement was not observed",
            "note",
            SLO_DRIFT,
            {"fault": window.name},
        )

    peak_t, peak = max(points, key=lambda point: point[1])
    evidence: dict[str, float | str] = {
        "fault": window.name,
        "peak_pct": round(peak * 100, 3),
        "samples": len(points),
    }
    if peak <= target:
        text = (
            f"drift stayed under {target * 100:g} % during {name} (peak "
            f"{peak * 100:.3g} % over {len(points)} samples): the replicas agreed "
            "again before a sample saw them apart, or the fault did not change "
            "what they serve"
        )
        return Finding("state-fault-drift", text, "note", SLO_DRIFT, evidence)

    healed = next((t for t, d in series if t > peak_t and d <= target), None)
    if healed is None:
        text = (
            f"drift reached {peak * 100:.3g} % during {name} and was still over "
            f"{target * 100:g} % when the next fault or the run's end came"
        )
    else:
        evidence["healed_after_s"] = round(healed - peak_t, 2)
        text = (
            f"drift reached {peak * 100:.3g} % during {name} and fell back under "
            f"{target * 100:g} % {healed - peak_t:.1f} s later"
        )
    return Finding("state-fault-drift", text, "note", SLO_DRIFT, evidence)


def _drift_finding(
    windows: Sequence[FaultWindow], samples: Sequence[DriftSample]
) -> Finding:
    evidence: dict[str, float | str] = {}
    worst = max(samples[-8:], key=lambda s: s.drift, default=None)
    odd = ""
    if worst is not None and (outlier := outlier_replica(worst)) is not None:
        name, tokens = outlier
        odd = (
            f"; replica {name} holds {tokens:g} of {worst.capacity:g} tokens for key "
            f"{worst.key} while the others differ"
        )
        evidence = {"replica": name, "key": worst.key, "tokens": tokens}

    state = [w for w in windows if w.type in STATE_FAULTS and not w.skipped]
    if state:
        cause = state[-1]
        kind = "restart" if cause.type == "process" else "state corruption"
        text = (
            f"drift stayed over target after the {kind} of {cause.name} "
            f"({', '.join(cause.replicas or cause.nodes) or 'all'}){odd}: the "
            "merge does not repair the damaged replica (a pointwise-max merge "
            "cannot lower a counter that was raised, nor restore one a restart lost "
            "unless peers resend it)"
        )
        return Finding(
            "drift-after-state-fault", text, slo=SLO_DRIFT, evidence=evidence
        )

    text = (
        f"drift stayed over target after recovery{odd}: gossip does not converge "
        "within the recovery window (check gossip interval and partitions)"
    )
    return Finding("drift-not-converged", text, slo=SLO_DRIFT, evidence=evidence)
