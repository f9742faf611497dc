"""Settings of a replica: bucket rules by key pattern, durations, peers."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

from token_bucket.crdt import BucketSpec

# 100 tokens refilled at 10/s: a 10 s window, a burst of 100.
DEFAULT_SPEC = BucketSpec(capacity=100.0, refill_per_s=10.0)

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m)?\s*$")
_RULE_RE = re.compile(r"^(?P<pattern>[^=]+)=(?P<capacity>[^/]+)/(?P<refill>.+)$")


def parse_duration(text: str) -> float:
    """Seconds in `text`: `0.5s`, `500ms`, `2m` or a bare number of seconds."""
    match = _DURATION_RE.match(text)
    if match is None:
        msg = f"{text!r} is not a duration: write e.g. 0.5s, 500ms or 2m"
        raise ValueError(msg)
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]


@dataclass(frozen=True)
class BucketRule:
    pattern: str
    spec: BucketSpec


def parse_rule(text: str) -> BucketRule:
    """Parse `PATTERN=CAPACITY/REFILL_PER_S`, e.g. `user:*=20/2`."""
    match = _RULE_RE.match(text.strip())
    if match is None:
        msg = (
            f"{text!r} is not a bucket rule: write PATTERN=CAPACITY/REFILL_PER_S, "
            "e.g. 'user:*=20/2' (20 tokens, 2 back per second)"
        )
        raise ValueError(msg)
    try:
        spec = BucketSpec(float(match["capacity"]), float(match["refill"]))
    except ValueError as exc:
        msg = f"bucket rule {text!r}: {exc}"
        raise ValueError(msg) from None
    return BucketRule(match["pattern"], spec)


@dataclass(frozen=True)
class BucketRules:
    """Which spec a key gets: the first rule whose fnmatch pattern matches it."""

    rules: tuple[BucketRule, ...] = ()
    default: BucketSpec = DEFAULT_SPEC

    def spec_for(self, key: str) -> BucketSpec:
        for rule in self.rules:
            if fnmatch.fnmatchcase(key, rule.pattern):
                return rule.spec
        return self.default


@dataclass(frozen=True)
class ReplicaSettings:
    replica_id: str
    state_path: Path
    peers: tuple[str, ...] = ()
    buckets: BucketRules = field(default_factory=BucketRules)
    gossip_interval_s: float = 0.5
    slot_s: float = 1.0
    # How many keys a gossip round compares to estimate drift.
    drift_sample_keys: int = 64
    # Test-only endpoint that pauses gossip (simulates a partition).
    admin: bool = False
    pidfile: Path | None = None
